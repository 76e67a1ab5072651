"""Make stock mergekit see the ``cpi`` merge method, without slowing Python down.

Installed as a top-level module plus ``cpift_merge_autoload.pth`` in site-packages.
At interpreter start it only adds an import hook (no torch, no mergekit). When a
process later imports ``mergekit.merge_methods``, the hook registers ``cpi``; when it
imports ``mergekit.plan``, the hook adds the check for misspelled ``cpi`` parameters.
Set ``CPIFT_NO_AUTOLOAD=1`` to turn it off. All logic lives in ``cpift_merge.mergekit.method``.
"""

import sys

# Plain classes on purpose: importlib.abc would pull in importlib.resources (~30 ms).

_AFTER = {
    "mergekit.merge_methods": "register_method",
    "mergekit.plan": "install_parameter_check",
}


def _run(hook):
    partial = sys.modules.get("cpift_merge.mergekit.method")
    if partial is not None and not hasattr(partial, hook):
        return  # cpift_merge.mergekit.method is being imported; it registers itself at its end
    from cpift_merge.mergekit import method

    getattr(method, hook)()


class _Loader:
    def __init__(self, loader, hook):
        self._loader, self._hook = loader, hook

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        _run(self._hook)

    def __getattr__(self, name):
        return getattr(self._loader, name)


class _Finder:
    def find_spec(self, fullname, path, target=None):
        hook = _AFTER.get(fullname)
        if hook is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _Loader(spec.loader, hook)
                return spec
        return None


def install():
    if any(isinstance(f, _Finder) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _Finder())
    for name, hook in _AFTER.items():  # already imported: hook now
        if name in sys.modules:
            _run(hook)
