"""The one exception users see: a one-line message that names the thing to fix."""


class CpiftError(Exception):
    """Bad input or state. The CLI prints ``error: <message>`` and exits 2."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


def first_line(err: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (its type's name when empty), cut to
    ``limit`` characters: what a one-line error quotes from a library's error."""
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:limit]


def load_yaml_mapping(path: str, what: str, hint: str) -> dict:
    """Read a YAML file that must hold a mapping (a recipe, a pipeline file); every
    problem is a one-line CpiftError naming ``what`` and ``path``."""
    import yaml

    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as err:
        raise CpiftError(f"cannot read {what} {path}: {err.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise CpiftError(f"{what} {path} line {line} is not UTF-8 text; save the file as UTF-8") from None
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
        if len(docs) > 1:
            if what == "recipe":
                raise CpiftError(
                    f"recipe {path} holds {len(docs)} YAML documents (a mergekit-multi recipe); run it with"
                    f" `mergekit-multi {path} --intermediate-dir DIR --out-path OUT` (cpi works there too)"
                )
            raise CpiftError(f"{what} {path} holds {len(docs)} YAML documents; give one mapping with {hint}")
        data = docs[0] if docs else None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise CpiftError(f"{what} {path} is not valid YAML{where}: {getattr(err, 'problem', err)}") from None
    if not isinstance(data, dict):
        raise CpiftError(f"{what} {path} must be a YAML mapping with {hint}")
    return data
