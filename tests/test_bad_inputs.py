"""Bad inputs: each is refused with one clear line (``error: ...`` on stderr, exit 2)
that names the thing to fix, and leaves no partial output behind (nothing at OUT, no
``.OUT.tmp-*`` sibling)."""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
from typing import Callable, Dict, List, Optional, Sequence

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from cpift_merge.cli import main

BIN = os.path.dirname(sys.executable)
LATE = "model.layers.1.mlp.down_proj.weight"  # late in mergekit's (and the file's) order
SHAPED = "model.layers.0.mlp.up_proj.weight"
MISSING = "model.layers.0.self_attn.k_proj.weight"


# ------------------------------------------------------------------ helpers


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CPIFT_CACHE", str(tmp_path / "cpift-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def edited_copy(src: str, dst: str, edit: Optional[Callable] = None, config: Optional[Callable] = None) -> str:
    """Copy an HF folder; edit its tensors (dict in place) and/or its config.json."""
    shutil.copytree(src, dst)
    if edit is not None:
        file = os.path.join(dst, "model.safetensors")
        tensors = load_file(file)
        edit(tensors)
        save_file(tensors, file, metadata={"format": "pt"})
    if config is not None:
        cfg_file = os.path.join(dst, "config.json")
        with open(cfg_file) as fh:
            cfg = json.load(fh)
        config(cfg)
        with open(cfg_file, "w") as fh:
            json.dump(cfg, fh)
    return dst


def _poison(name: str, value: float):
    def edit(t):
        t[name].view(-1)[t[name].numel() // 2] = value

    return edit


@pytest.fixture(scope="module")
def bad(tiny_models, tmp_path_factory) -> Dict[str, str]:
    """Broken copies of fine-tune a."""
    root = tmp_path_factory.mktemp("bad")
    a = tiny_models["a"]

    def reshape(t):
        t[SHAPED] = torch.zeros(t[SHAPED].shape[0] + 1, t[SHAPED].shape[1])

    return {
        "arch": edited_copy(a, str(root / "arch"), config=lambda c: c.update(architectures=["MistralForCausalLM"])),
        "shape": edited_copy(a, str(root / "shape"), reshape),
        "missing": edited_copy(a, str(root / "missing"), lambda t: t.pop(MISSING)),
        "nan": edited_copy(a, str(root / "nan"), _poison(LATE, float("nan"))),
        "inf": edited_copy(a, str(root / "inf"), _poison("lm_head.weight", float("-inf"))),
    }


@pytest.fixture(scope="module")
def regions_dir(tiny_models, tmp_path_factory) -> str:
    """A good region directory: tasks math (a) and code (b), density 0.02, global."""
    from cpift_merge.storage.regions import compute_from_paths

    out = str(tmp_path_factory.mktemp("regions") / "reg")
    compute_from_paths(
        tiny_models["base"],
        {"math": tiny_models["a"], "code": tiny_models["b"]},
        out,
        density=0.02,
        scope="global",
        progress=False,
    )
    return out


def copy_regions(regions_dir: str, dst: str, edit: Callable[[str], None]) -> str:
    shutil.copytree(regions_dir, dst)
    edit(dst)
    return dst


def cli(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def regions_cli(base: str, models: Dict[str, str], out: str, *extra: str, density: str = "0.02"):
    flags: List[str] = []
    for name, path in models.items():
        flags += ["--model", f"{name}={path}"]
    return cli("regions", "--quiet", "--base", base, *flags, "--density", density, "--out", out, *extra)


def merge_cli(config: str, out: str, *extra: str):
    return cli("merge", "--quiet", "--no-copy-tokenizer", *extra, config, out)


def recipe(tmp_path, models: Sequence, base: str, params: Optional[dict] = None, name: str = "recipe.yml") -> str:
    """Write a cpi recipe; ``models`` holds paths or (path, per-model parameters)."""
    items = []
    for m in models:
        path, mp = (m, None) if isinstance(m, str) else m
        items.append({"model": path, **({"parameters": mp} if mp else {})})
    doc = {"merge_method": "cpi", "base_model": base, "models": items, "dtype": "float32"}
    if params:
        doc["parameters"] = params
    file = str(tmp_path / name)
    with open(file, "w", encoding="utf-8") as fh:
        yaml.safe_dump(doc, fh, sort_keys=False)
    return file


def assert_no_output(out: str) -> None:
    assert not os.path.exists(out), f"partial output left at {out}"
    leftovers = glob.glob(os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.*"))
    assert not leftovers, leftovers


def error_line(res, code: int = 2) -> str:
    """The single ``error: ...`` line of a refused command (no traceback, no noise)."""
    assert res.exit_code == code, (res.exit_code, res.output, res.exception)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("error: "), lines[0]
    assert "Traceback" not in res.output
    return lines[0]


def assert_refused(res, out: str, *needles: str, code: int = 2) -> str:
    line = error_line(res, code)
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    assert_no_output(out)
    return line


# ----------------------------------------------------- models that do not line up

MISMATCH = {
    "arch": ("MistralForCausalLM", "LlamaForCausalLM", "architecture"),
    "shape": (SHAPED, "[65, 32]", "[64, 32]"),
    "missing": (MISSING, "missing"),
}


@pytest.mark.parametrize("kind", sorted(MISMATCH))
def test_regions_refuses_models_that_do_not_line_up(kind, bad, tiny_models, tmp_path):
    out = str(tmp_path / "reg")
    res = regions_cli(tiny_models["base"], {"broken": bad[kind], "b": tiny_models["b"]}, out)
    assert_refused(res, out, "broken", *MISMATCH[kind])


@pytest.mark.parametrize("kind", sorted(MISMATCH))
def test_merge_refuses_models_that_do_not_line_up(kind, bad, tiny_models, tmp_path):
    out = str(tmp_path / "out")
    config = recipe(tmp_path, [bad[kind], tiny_models["b"]], tiny_models["base"], {"density": 0.01})
    assert_refused(merge_cli(config, out), out, bad[kind], *MISMATCH[kind])


def test_merge_refuses_a_broken_base(bad, tiny_models, tmp_path):
    out = str(tmp_path / "out")
    config = recipe(tmp_path, [tiny_models["a"], tiny_models["b"]], bad["shape"])
    assert_refused(merge_cli(config, out), out, SHAPED, "shape")


# --------------------------------------------------------------- NaN / Inf

POISONED = {"nan": LATE, "inf": "lm_head.weight"}


@pytest.mark.parametrize("kind", sorted(POISONED))
def test_regions_refuses_nan_inf(kind, bad, tiny_models, tmp_path):
    out = str(tmp_path / "reg")
    res = regions_cli(tiny_models["base"], {"b": tiny_models["b"], "poisoned": bad[kind]}, out)
    assert_refused(res, out, "poisoned", POISONED[kind], "NaN or Inf")


@pytest.mark.parametrize("kind", sorted(POISONED))
def test_regions_refuses_nan_inf_in_the_base(kind, bad, tiny_models, tmp_path):
    out = str(tmp_path / "reg")
    res = regions_cli(bad[kind], {"b": tiny_models["b"]}, out)
    assert_refused(res, out, "base", POISONED[kind], "NaN or Inf")


@pytest.mark.parametrize("scope", ["global", "tensor"])
@pytest.mark.parametrize("kind", sorted(POISONED))
def test_merge_refuses_nan_inf(kind, scope, bad, tiny_models, tmp_path):
    out = str(tmp_path / "out")
    config = recipe(tmp_path, [tiny_models["b"], bad[kind]], tiny_models["base"], {"scope": scope})
    assert_refused(merge_cli(config, out), out, bad[kind], POISONED[kind], "NaN or Inf")


# ---------------------------------------------------------- values out of range


@pytest.mark.parametrize("density", ["1.5", "-0.1", "nan"])
def test_regions_density_out_of_range(density, tiny_models, tmp_path):
    out = str(tmp_path / "reg")
    res = regions_cli(tiny_models["base"], {"a": tiny_models["a"]}, out, density=density)
    assert_refused(res, out, "density", "[0, 1]")


@pytest.mark.parametrize("tau", ["-0.1", "1.5"])
def test_regions_tau_out_of_range(tau, tiny_models, tmp_path):
    out = str(tmp_path / "reg")
    res = regions_cli(tiny_models["base"], {"a": tiny_models["a"], "b": tiny_models["b"]}, out, "--tau", tau)
    assert_refused(res, out, "tau", "[0, 1]", tau)


@pytest.mark.parametrize(
    "params, needles",
    [
        ({"density": -0.1}, ["density", "-0.1"]),
        ({"density": 1.01}, ["density", "1.01"]),
        ({"omega": 1.5}, ["omega", "1.5"]),
        ({"omega": -0.5}, ["omega", "-0.5"]),
        ({"omega": [0.2, 1.3]}, ["omega", "1.3"]),
        ({"omega": [{"filter": "mlp", "value": 1.5}, {"value": 0.5}]}, ["omega", "1.5"]),
        ({"omega": "half"}, ["omega", "half"]),
        ({"epsilon": -1.0}, ["epsilon"]),
        ({"scope": "model"}, ["scope", "model"]),
        ({"overlap": "maxdelta"}, ["overlap", "maxdelta"]),
        ({"density": [0.01, 0.02]}, ["density", "plain value"]),
    ],
    ids=lambda v: json.dumps(v) if isinstance(v, dict) else None,
)
def test_merge_value_out_of_range(params, needles, tiny_models, tmp_path):
    out = str(tmp_path / "out")
    config = recipe(tmp_path, [tiny_models["a"], tiny_models["b"]], tiny_models["base"], params)
    assert_refused(merge_cli(config, out), out, *needles)


def test_merge_wide_parameter_on_a_model_is_refused(tiny_models, tmp_path):
    """mergekit reads omega only from merge-wide blocks: on a model it would be ignored."""
    out = str(tmp_path / "out")
    config = recipe(tmp_path, [(tiny_models["a"], {"omega": 2.0}), tiny_models["b"]], tiny_models["base"])
    assert_refused(merge_cli(config, out), out, "omega", "models[0]", "merge-wide")


# ---------------------------------------------------------------- region files


def test_region_file_from_other_models(regions_dir, tiny_models, tmp_path):
    """regions were made from a and b; the recipe merges a and c."""
    out = str(tmp_path / "out")
    config = recipe(tmp_path, [tiny_models["a"], tiny_models["c"]], tiny_models["base"], {"regions": regions_dir})
    assert_refused(merge_cli(config, out), out, "other models", tiny_models["c"], regions_dir)


def test_region_file_from_other_models_with_tasks(regions_dir, tiny_models, tmp_path):
    out = str(tmp_path / "out")
    config = recipe(
        tmp_path,
        [(tiny_models["a"], {"task": "math"}), (tiny_models["c"], {"task": "code"})],
        tiny_models["base"],
        {"regions": regions_dir},
    )
    assert_refused(merge_cli(config, out), out, "other models", tiny_models["c"])


@pytest.mark.parametrize(
    "params, needles",
    [
        ({"density": 0.05}, ["density", "0.02", "0.05"]),
        ({"scope": "tensor"}, ["scope", "global", "tensor"]),
    ],
    ids=["density", "scope"],
)
def test_region_file_with_other_settings(params, needles, regions_dir, tiny_models, tmp_path):
    out = str(tmp_path / "out")
    config = recipe(
        tmp_path, [tiny_models["a"], tiny_models["b"]], tiny_models["base"], {"regions": regions_dir, **params}
    )
    assert_refused(merge_cli(config, out), out, regions_dir, *needles)


def _garbage_json(d):
    with open(os.path.join(d, "regions.json"), "w") as fh:
        fh.write("{this is not json")


def _not_a_region_file(d):
    with open(os.path.join(d, "regions.json"), "w") as fh:
        json.dump({"format": "something-else", "tasks": {}}, fh)


def _truncate_mask(d):
    f = os.path.join(d, "masks", "code.safetensors")
    data = open(f, "rb").read()
    open(f, "wb").write(data[: len(data) // 2])


def _stub_mask(d):
    open(os.path.join(d, "masks", "code.safetensors"), "wb").write(b"\x07")


def _flip_mask_bit(d):
    f = os.path.join(d, "masks", "code.safetensors")
    data = bytearray(open(f, "rb").read())
    data[-1] ^= 0x01
    open(f, "wb").write(bytes(data))


def _drop_mask(d):
    os.remove(os.path.join(d, "masks", "code.safetensors"))


def _no_meta(d):
    os.remove(os.path.join(d, "regions.json"))


def _edit_meta(edit):
    def apply(d):
        with open(os.path.join(d, "regions.json")) as fh:
            meta = json.load(fh)
        edit(meta)
        with open(os.path.join(d, "regions.json"), "w") as fh:
            json.dump(meta, fh)

    return apply


def _swap_header_names(d):
    """Swap two tensors' names in a mask file's safetensors header (same length)."""
    import struct

    f = os.path.join(d, "masks", "code.safetensors")
    data = open(f, "rb").read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    a, b = "model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight"
    header[a], header[b] = header[b], header[a]
    blob = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    open(f, "wb").write(data[:8] + blob + data[8 + n :])


def _traversal(d):
    other = os.path.join(os.path.dirname(d), "other")
    shutil.copytree(d, other)
    _edit_meta(lambda m: m["tasks"]["code"].update(mask_file="../other/masks/code.safetensors"))(d)


CORRUPTIONS = {
    "garbage_json": (_garbage_json, ["regions.json", "corrupt"]),
    "not_a_region_file": (_not_a_region_file, ["regions.json", "not a cpift region file"]),
    "no_regions_json": (_no_meta, ["regions.json", "not a region directory"]),
    "truncated_mask": (_truncate_mask, ["code", "truncated"]),
    "stub_mask": (_stub_mask, ["code", "truncated"]),
    "flipped_mask_bit": (_flip_mask_bit, ["code", "corrupt"]),
    "missing_mask": (_drop_mask, ["code", "missing"]),
    "swapped_header_names": (_swap_header_names, ["code", "edited"]),
    "mask_file_outside": (_traversal, ["mask file '../other/masks/code.safetensors'", "not inside"]),
    "mask_file_absolute": (
        _edit_meta(lambda m: m["tasks"]["code"].update(mask_file="/etc/passwd")),
        ["'/etc/passwd'", "not inside"],
    ),
    "wrong_k": (_edit_meta(lambda m: m["tasks"]["code"].update(k=5)), ["task code", "k = 5"]),
    "wrong_k_and_counts": (
        _edit_meta(lambda m: (m["tasks"]["code"].update(k=5), m.pop("counts"))),
        ["task code", "k = 5"],
    ),
    "bogus_scope": (_edit_meta(lambda m: m.update(scope="bogus")), ["field scope", "'bogus'"]),
    "string_density": (_edit_meta(lambda m: m.update(density="0.01")), ["field density", "'0.01'"]),
    "density_above_one": (_edit_meta(lambda m: m.update(density=2.0)), ["field density"]),
    "k_not_int": (_edit_meta(lambda m: m["tasks"]["code"].update(k=5.5)), ["field tasks.code.k"]),
    "wrong_D": (_edit_meta(lambda m: m.update(D=m["D"] + 1)), ["D is"]),
    "unknown_version": (_edit_meta(lambda m: m.update(version=9)), ["version 9"]),
}


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_corrupt_region_file(kind, regions_dir, tiny_models, tmp_path):
    edit, needles = CORRUPTIONS[kind]
    broken = copy_regions(regions_dir, str(tmp_path / "broken-regions"), edit)
    out = str(tmp_path / "out")
    config = recipe(tmp_path, [tiny_models["a"], tiny_models["b"]], tiny_models["base"], {"regions": broken})
    assert_refused(merge_cli(config, out), out, broken, *needles)


def _as_version_1(d):
    """Rewrite a region directory as version 1 wrote it: checksums of the data after
    each mask file's header."""
    import hashlib
    import struct

    def edit(meta):
        meta["version"] = 1
        for info in meta["tasks"].values():
            data = open(os.path.join(d, info["mask_file"]), "rb").read()
            (n,) = struct.unpack("<Q", data[:8])
            info["mask_sha256"] = hashlib.sha256(data[8 + n :]).hexdigest()

    _edit_meta(edit)(d)


def test_version_1_region_file_loads_and_its_masks_are_counted(regions_dir, tiny_models, tmp_path):
    from cpift_merge.errors import CpiftError
    from cpift_merge.storage.regions import load_regions

    v1 = copy_regions(regions_dir, str(tmp_path / "v1"), _as_version_1)
    rs, fresh = load_regions(v1), load_regions(regions_dir)
    assert rs.meta["version"] == 1 and fresh.meta["version"] == 2
    assert all(torch.equal(rs.mask("code", t), fresh.mask("code", t)) for t in fresh.tensor_names)
    out = str(tmp_path / "out")
    config = recipe(tmp_path, [tiny_models["a"], tiny_models["b"]], tiny_models["base"], {"regions": v1})
    assert merge_cli(config, out).exit_code == 0
    # version 1's checksum misses a swap of two names in a header; the per-tensor counts do not
    counts = rs.meta["counts"]["code"]
    assert counts["model.layers.0.mlp.up_proj.weight"] != counts["model.layers.1.mlp.up_proj.weight"]
    _swap_header_names(v1)
    with pytest.raises(CpiftError, match="holds .* entries for model.layers.0.mlp.up_proj.weight"):
        load_regions(v1)


def test_missing_region_dir(tiny_models, tmp_path):
    out = str(tmp_path / "out")
    config = recipe(tmp_path, [tiny_models["a"]], tiny_models["base"], {"regions": "./no-such-regions"})
    assert_refused(merge_cli(config, out), out, "no-such-regions", "does not exist")


def test_unknown_task_name(regions_dir, tiny_models, tmp_path):
    out = str(tmp_path / "out")
    config = recipe(
        tmp_path,
        [(tiny_models["a"], {"task": "mathh"}), (tiny_models["b"], {"task": "code"})],
        tiny_models["base"],
        {"regions": regions_dir},
    )
    assert_refused(merge_cli(config, out), out, "'mathh'", "math")


# ------------------------------------------------------------ duplicate tasks


def test_regions_duplicate_task_names(tiny_models, tmp_path):
    out = str(tmp_path / "reg")
    res = cli(
        "regions",
        "--quiet",
        "--base",
        tiny_models["base"],
        "--model",
        f"a={tiny_models['a']}",
        "--model",
        f"a={tiny_models['b']}",
        "--density",
        "0.01",
        "--out",
        out,
    )
    assert_refused(res, out, "duplicate", "'a'")


def test_regions_bad_task_name(tiny_models, tmp_path):
    out = str(tmp_path / "reg")
    res = regions_cli(tiny_models["base"], {"my task": tiny_models["a"]}, out)
    assert_refused(res, out, "'my task'")


def test_merge_two_models_one_task(regions_dir, tiny_models, tmp_path):
    out = str(tmp_path / "out")
    twin = shutil.copytree(tiny_models["a"], str(tmp_path / "a-copy"))
    config = recipe(tmp_path, [tiny_models["a"], twin], tiny_models["base"], {"regions": regions_dir})
    assert_refused(merge_cli(config, out), out, "both task math", twin)


# ------------------------------------------------------------ existing output


def _occupied(path: str) -> str:
    os.makedirs(path)
    with open(os.path.join(path, "keep.txt"), "w") as fh:
        fh.write("precious")
    return path


def _siblings(out: str) -> List[str]:
    return glob.glob(os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.*"))


def test_merge_output_exists(tiny_models, tmp_path):
    out = _occupied(str(tmp_path / "out"))
    config = recipe(tmp_path, [tiny_models["a"], tiny_models["b"]], tiny_models["base"], {"density": 0.01})
    line = error_line(merge_cli(config, out))
    assert out in line and "--overwrite" in line
    assert os.listdir(out) == ["keep.txt"] and not _siblings(out)

    res = merge_cli(config, out, "--overwrite")
    assert res.exit_code == 0, res.output
    assert not os.path.exists(os.path.join(out, "keep.txt"))
    assert {"config.json", "model.safetensors", "cpi_stats.json"} <= set(os.listdir(out))
    assert not _siblings(out)


def test_regions_output_exists(tiny_models, tmp_path):
    out = _occupied(str(tmp_path / "reg"))
    models = {"a": tiny_models["a"], "b": tiny_models["b"]}
    line = error_line(regions_cli(tiny_models["base"], models, out))
    assert out in line and "--overwrite" in line
    assert os.listdir(out) == ["keep.txt"] and not _siblings(out)

    res = regions_cli(tiny_models["base"], models, out, "--overwrite")
    assert res.exit_code == 0, res.output
    assert not os.path.exists(os.path.join(out, "keep.txt"))
    assert os.path.isfile(os.path.join(out, "regions.json")) and not _siblings(out)


# ------------------------------------------------------------ unreadable paths


def test_regions_nonexistent_model(tiny_models, tmp_path):
    out, nope = str(tmp_path / "reg"), str(tmp_path / "no-such-model")
    assert_refused(regions_cli(tiny_models["base"], {"a": nope}, out), out, nope)
    assert_refused(regions_cli(nope, {"a": tiny_models["a"]}, out), out, nope)


@pytest.mark.parametrize("which", ["model", "base"])
def test_merge_nonexistent_model(which, tiny_models, tmp_path):
    out, nope = str(tmp_path / "out"), str(tmp_path / "no-such-model")
    models = [nope] if which == "model" else [tiny_models["a"]]
    base = nope if which == "base" else tiny_models["base"]
    assert_refused(merge_cli(recipe(tmp_path, models, base), out), out, nope)


def test_merge_nonexistent_model_says_so(tiny_models, tmp_path):
    out, nope = str(tmp_path / "out"), str(tmp_path / "no-such-model")
    line = assert_refused(merge_cli(recipe(tmp_path, [nope], tiny_models["base"]), out), out, nope)
    assert any(w in line for w in ("does not exist", "no such", "cannot read", "not found")), line


def test_merge_unreadable_recipe(tmp_path):
    out = str(tmp_path / "out")
    assert_refused(merge_cli(str(tmp_path / "nope.yml"), out), out, "nope.yml")
    bad_yaml = tmp_path / "bad.yml"
    bad_yaml.write_text("merge_method: cpi\nmodels: [\n")
    assert_refused(merge_cli(str(bad_yaml), out), out, "bad.yml", "YAML")


# ----------------------------------------------------------- unknown parameters


def test_merge_unknown_parameter(tiny_models, tmp_path):
    out = str(tmp_path / "out")
    config = recipe(tmp_path, [tiny_models["a"]], tiny_models["base"], {"omgea": 0.3})
    assert_refused(merge_cli(config, out), out, "'omgea'", "omega")


def test_merge_unknown_per_model_parameter(tiny_models, tmp_path):
    out = str(tmp_path / "out")
    config = recipe(tmp_path, [(tiny_models["a"], {"tsk": "math"})], tiny_models["base"])
    assert_refused(merge_cli(config, out), out, "'tsk'", "models[0]")


@pytest.mark.parametrize(
    "params, needle",
    [({"omgea": 0.3}, "unknown cpi parameter 'omgea'"), ({"omega": 1.5}, "omega in parameters must be a number")],
)
def test_stock_mergekit_yaml_bad_parameter_is_one_line(params, needle, tiny_models, tmp_path):
    """Under stock mergekit-yaml a bad cpi parameter fails like mergekit's own checks:
    one `Error: cpi: ...` line, no traceback, nothing written."""
    out = str(tmp_path / "out")
    config = recipe(tmp_path, [tiny_models["a"], tiny_models["b"]], tiny_models["base"], {**params, "density": 0.01})
    proc = subprocess.run(
        [os.path.join(BIN, "mergekit-yaml"), config, out, "--no-copy-tokenizer", "--quiet"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=str(tmp_path),
    )
    assert proc.returncode != 0
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("Error: ")]
    assert len(errors) == 1 and errors[0].startswith("Error: cpi: ") and needle in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not glob.glob(os.path.join(out, "*.safetensors"))


# ------------------------------------------------------------ interrupted merges


def _counting(monkeypatch, fail_at: Optional[int] = None, exc: Optional[BaseException] = None):
    """Wrap the kernel's fuse_stream (as imported by cpift_merge.mergekit.method) to count calls
    and optionally raise on call ``fail_at``; yields the list of calls."""
    from cpift_merge.mergekit import method

    calls: List[int] = []
    real = method.fuse_stream

    def fuse(*args, **kwargs):
        calls.append(1)
        if fail_at is not None and len(calls) == fail_at:
            raise exc
        return real(*args, **kwargs)

    monkeypatch.setattr(method, "fuse_stream", fuse)
    return calls


def test_merge_nan_in_late_tensor_fails_mid_merge(bad, tiny_models, tmp_path, monkeypatch):
    """scope tensor has no pre-pass: the kernel meets the NaN after merging others."""
    calls = _counting(monkeypatch)
    out = str(tmp_path / "out")
    config = recipe(tmp_path, [tiny_models["b"], bad["nan"]], tiny_models["base"], {"scope": "tensor"})
    assert_refused(merge_cli(config, out, "--out-shard-size", "2K"), out, LATE, "NaN or Inf")
    assert len(calls) > 3  # the merge was under way


def test_merge_kernel_error_mid_merge_leaves_nothing(tiny_models, tmp_path, monkeypatch):
    """merge.run in-process; small shards so shards are already on disk when it fails."""
    from mergekit.options import MergeOptions

    from cpift_merge.errors import CpiftError
    from cpift_merge.mergekit import method
    from cpift_merge.mergekit import recipe as merge

    out = str(tmp_path / "out")
    seen: List[List[str]] = []
    real = method.fuse_stream
    calls: List[int] = []

    def fuse(*args, **kwargs):
        calls.append(1)
        if len(calls) == 15:
            seen.extend(os.listdir(d) for d in glob.glob(str(tmp_path / ".out.tmp-*")))
            raise RuntimeError("disk on fire")
        return real(*args, **kwargs)

    monkeypatch.setattr(method, "fuse_stream", fuse)
    config = recipe(tmp_path, [tiny_models["a"], tiny_models["b"]], tiny_models["base"], {"density": 0.01})
    options = MergeOptions(out_shard_size=2000, quiet=True, copy_tokenizer=False)
    with pytest.raises(CpiftError, match="merge failed: RuntimeError: disk on fire"):
        merge.run(config, out, options, progress=False)
    assert seen and any(f.endswith(".safetensors") for f in seen[0]), seen  # was partial
    assert_no_output(out)


def test_merge_ctrl_c_leaves_nothing(tiny_models, tmp_path, monkeypatch):
    _counting(monkeypatch, fail_at=10, exc=KeyboardInterrupt())
    out = str(tmp_path / "out")
    config = recipe(tmp_path, [tiny_models["a"], tiny_models["b"]], tiny_models["base"], {"density": 0.01})
    assert_refused(merge_cli(config, out, "--out-shard-size", "2K"), out, "interrupted", code=130)


def test_regions_interrupted_leaves_nothing(tiny_models, tmp_path, monkeypatch):
    from cpift_merge.storage import regions

    real = regions.SafetensorsWriter.add
    calls: List[int] = []

    def add(self, name, data):
        calls.append(1)
        if len(calls) == 20:
            raise KeyboardInterrupt()
        return real(self, name, data)

    monkeypatch.setattr(regions.SafetensorsWriter, "add", add)
    out = str(tmp_path / "reg")
    res = regions_cli(tiny_models["base"], {"a": tiny_models["a"], "b": tiny_models["b"]}, out)
    assert_refused(res, out, "interrupted", code=130)


# ------------------------------------------------------ found while testing (bugs)


def test_shared_parameter_per_model_is_not_silently_ignored(tiny_models, tmp_path):
    out = str(tmp_path / "out")
    config = recipe(tmp_path, [(tiny_models["a"], {"omega": 1.0, "density": 0.5})], tiny_models["base"])
    res = merge_cli(config, out)
    if res.exit_code == 2:  # refusing it is fine too
        assert "omega" in error_line(res) or "density" in error_line(res)
        return
    assert res.exit_code == 0, res.output
    stats = json.load(open(os.path.join(out, "cpi_stats.json")))
    assert stats["density"] == 0.5
    assert stats["tensors"]["lm_head.weight"]["omega"] == 1.0


def test_region_dir_recomputed_in_place_is_reread(tiny_models, tmp_path):
    from mergekit.options import MergeOptions

    from cpift_merge.mergekit import recipe as merge
    from cpift_merge.storage.regions import compute_from_paths

    reg = str(tmp_path / "reg")
    config = recipe(tmp_path, [(tiny_models["a"], {"task": "x"})], tiny_models["base"], {"regions": reg})
    options = MergeOptions(quiet=True, copy_tokenizer=False)
    for i, density in enumerate([0.01, 0.2]):
        rs = compute_from_paths(
            tiny_models["base"], {"x": tiny_models["a"]}, reg, density=density, overwrite=True, progress=False
        )
        out = merge.run(config, str(tmp_path / f"out{i}"), options, progress=False)
        stats = json.load(open(os.path.join(out, "cpi_stats.json")))
        assert stats["core_entries"] == rs.k("x"), (density, stats["core_entries"], rs.k("x"))


def test_swapped_task_names_point_at_the_task(regions_dir, tiny_models, tmp_path):
    out = str(tmp_path / "out")
    config = recipe(
        tmp_path,
        [(tiny_models["a"], {"task": "code"}), (tiny_models["b"], {"task": "math"})],
        tiny_models["base"],
        {"regions": regions_dir},
    )
    line = assert_refused(merge_cli(config, out), out, tiny_models["a"])
    assert "recompute" not in line and "task: math" in line.replace("'", ""), line


def test_bad_exclude_regex_named_in_tensor_scope(tiny_models, tmp_path):
    out = str(tmp_path / "out")
    config = recipe(tmp_path, [tiny_models["a"]], tiny_models["base"], {"scope": "tensor", "exclude": "(["})
    assert_refused(merge_cli(config, out), out, "exclude")


def test_bad_exclude_regex_named_in_global_scope(tiny_models, tmp_path):
    out = str(tmp_path / "out")
    config = recipe(tmp_path, [tiny_models["a"]], tiny_models["base"], {"exclude": "(["})
    assert_refused(merge_cli(config, out), out, "exclude", "([")


def test_non_string_task_is_named(regions_dir, tiny_models, tmp_path):
    out = str(tmp_path / "out")
    config = recipe(tmp_path, [(tiny_models["a"], {"task": 3})], tiny_models["base"], {"regions": regions_dir})
    assert_refused(merge_cli(config, out), out, "task")


def test_real_cli_mid_merge_error_is_the_only_stderr_line(bad, tiny_models, tmp_path):
    out = str(tmp_path / "out")
    config = recipe(tmp_path, [tiny_models["b"], bad["nan"]], tiny_models["base"], {"scope": "tensor"})
    proc = subprocess.run(
        [os.path.join(BIN, "cpift"), "merge", "--quiet", "--no-copy-tokenizer", config, out],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=str(tmp_path),
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert_no_output(out)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith("error: ") and LATE in lines[-1], lines
    assert len(lines) == 1, lines


@pytest.mark.parametrize("kind", sorted(POISONED))
def test_merge_nan_inf_found_by_the_prepass_child(kind, bad, tiny_models, tmp_path, request):
    """`cpift merge` runs the global pre-pass in a child process (for models big enough);
    its error reaches the user as the same one line as in-process."""
    from cpift_merge.mergekit import prepass

    config = recipe(tmp_path, [tiny_models["b"], bad[kind]], tiny_models["base"], {"scope": "global"})
    line = assert_refused(merge_cli(config, str(tmp_path / "o1")), str(tmp_path / "o1"), bad[kind], "NaN or Inf")
    started = request.getfixturevalue("children")  # from here on, tiny models get a child too
    out = str(tmp_path / "o2")
    assert assert_refused(merge_cli(config, out), out) == line
    assert len(started) == 1 and started[0].returncode == prepass.ERROR_EXIT


def test_real_cli_nan_found_by_the_forked_prepass_is_one_line(bad, tiny_models, tmp_path):
    from test_merge import run_forking_cli

    out = str(tmp_path / "out")
    config = recipe(tmp_path, [tiny_models["b"], bad["nan"]], tiny_models["base"], {"scope": "global"})
    proc = run_forking_cli(config, out, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"forked [{2}]" in proc.stdout  # the child's CpiftError exit status
    assert_no_output(out)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and LATE in lines[0] and bad["nan"] in lines[0], lines


# ------------------------------------------------- an output that would destroy an input


def _digest_tree(path: str) -> Dict[str, bytes]:
    out = {}
    for root, _dirs, files in os.walk(path):
        for f in files:
            with open(os.path.join(root, f), "rb") as fh:
                out[os.path.relpath(os.path.join(root, f), path)] = fh.read()
    return out


def test_output_equal_to_inside_or_containing_an_input_is_refused(tiny_models, tmp_path):
    """`--overwrite` never turns an input into the output: equal, inside, containing."""
    work = tmp_path / "work"
    base = shutil.copytree(tiny_models["base"], str(work / "base"))
    a = shutil.copytree(tiny_models["a"], str(work / "a"))
    before = {p: _digest_tree(p) for p in (base, a)}
    for out in (a, base, str(work), os.path.join(a, "regions")):
        line = error_line(regions_cli(base, {"math": a}, out, "--overwrite"))
        assert "overlaps the input" in line and "--overwrite" not in line, line
    config = recipe(work, [a], base)
    for out in (base, a, str(work), os.path.join(base, "merged")):
        line = error_line(merge_cli(config, out, "--overwrite"))
        assert "overlaps the input" in line, line
    assert {p: _digest_tree(p) for p in (base, a)} == before
    assert os.path.isfile(config) and sorted(os.listdir(work)) == ["a", "base", "recipe.yml"]
    assert_no_output(os.path.join(a, "regions"))


def test_non_utf8_recipe_and_null_parameters_are_one_line(tiny_models, tmp_path):
    out = str(tmp_path / "out")
    config = recipe(tmp_path, [tiny_models["a"]], tiny_models["base"], {"omega": None})
    assert_refused(merge_cli(config, out), out, "parameters.omega is empty (null)")
    config = recipe(tmp_path, [(tiny_models["a"], {"weight": None})], tiny_models["base"])
    assert_refused(merge_cli(config, out), out, "models[0].weight is empty (null)")
    raw = tmp_path / "latin1.yml"
    raw.write_bytes(b"merge_method: cpi\n# caf\xe9\nbase_model: x\n")
    assert_refused(merge_cli(str(raw), out), out, "line 2 is not UTF-8 text")


def test_multi_document_recipe_points_to_mergekit_multi(tiny_models, tmp_path):
    one = {"merge_method": "linear", "models": [{"model": tiny_models["a"], "parameters": {"weight": 1.0}}]}
    path = tmp_path / "multi.yml"
    path.write_text(yaml.safe_dump({**one, "name": "first"}) + "---\n" + yaml.safe_dump(one))
    out = str(tmp_path / "out")
    assert_refused(cli("merge", str(path), out), out, "holds 2 YAML documents", "mergekit-multi", "--intermediate-dir")
    pipe = tmp_path / "pipe.yml"
    pipe.write_text("base: smollm2\n---\nbase: smollm2\n")
    res = cli("run", str(pipe), "--out", str(tmp_path / "p"))
    assert_refused(res, str(tmp_path / "p"), "pipeline", "holds 2 YAML documents")
