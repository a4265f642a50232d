"""The checks behind scripts/check_wheel.sh, one subcommand per step (the script says which interpreter
runs which):

    inspect WHEEL SDIST REPO   the wheel's metadata against pyproject.toml, its file list against the
                               checkout's package (every module, no tests or benchmarks), the sdist's
    link WHEEL SITE DEPS       the distributions the wheel declares (its core requirements and the
                               transformers and bench extras, with everything they require), found in
                               this interpreter's environment (.venv), linked into the folder DEPS, and
                               DEPS put on the clean environment's path (a .pth file in SITE): torch is
                               reused, and nothing the wheel does not declare is importable
    smoke REPO                 in the clean environment: flashattn comes from the wheel, every public entry
                               point and every module imports, tiny CPU calls match a plain computation
    interpret                  the same, through the Triton kernels under Triton's interpreter
    notriton                   the package imports and runs its PyTorch path without triton, which it
                               requires only on Linux

Each step prints what it checked and raises on the first failure.
"""
from __future__ import annotations

import sys
import zipfile
from pathlib import Path

# The subpackages that must be in the wheel (the file list is also compared with the checkout's whole package)
SUBPACKAGES = ("flashattn/nn", "flashattn/distributed", "flashattn/integrations", "flashattn/bench", "flashattn/bench/paper", "flashattn/ops",
               "flashattn/ops/triton")
EXTRAS = {"transformers", "bench", "test"}
# Extras whose distributions the clean environment gets (test's are the test runner's, not the package's)
LINKED_EXTRAS = ("transformers", "bench")
# Modules that need an extra, and the modules that extra provides: imported only where those are installed
NEEDS_EXTRA = {"flashattn.integrations.transformers": ("transformers",), "flashattn.bench": ("rich", "matplotlib")}


def fail(message: str):
    raise SystemExit(f"check_wheel: FAILED: {message}")


def check(condition: bool, message: str) -> None:
    if not condition:
        fail(message)


# ---------------------------------------------------------------------------------------------- inspect

def _requirements(lines):
    from packaging.requirements import Requirement
    return [Requirement(line) for line in lines]


def _key(req) -> tuple:
    """A requirement without its extra marker, comparable across pyproject.toml and METADATA."""
    from packaging.utils import canonicalize_name
    marker = str(req.marker) if req.marker is not None else ""
    for extra in EXTRAS:   # METADATA appends `extra == "name"` to the marker
        marker = marker.replace(f' and extra == "{extra}"', "").replace(f'extra == "{extra}"', "")
    marker = marker.strip()
    if marker.startswith("(") and marker.endswith(")"):
        marker = marker[1:-1]
    return canonicalize_name(req.name), str(req.specifier), tuple(sorted(req.extras)), marker


def inspect(wheel: str, sdist: str, repo: str) -> None:
    from email.parser import Parser
    try:
        import tomllib
    except ModuleNotFoundError:   # Python 3.10
        from pip._vendor import tomli as tomllib

    repo_path = Path(repo)
    project = tomllib.loads((repo_path / "pyproject.toml").read_text())["project"]
    name, version = project["name"], project["version"]
    wheel_path = Path(wheel)
    check(wheel_path.name == f"{name}-{version}-py3-none-any.whl",
          f"{wheel_path.name}: expected {name}-{version}-py3-none-any.whl (pure Python, any platform)")
    dist_info = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(wheel_path) as z:
        names = z.namelist()
        meta = Parser().parsestr(z.read(f"{dist_info}/METADATA").decode())
        wheel_meta = Parser().parsestr(z.read(f"{dist_info}/WHEEL").decode())
        init = z.read("flashattn/__init__.py").decode()

    # -- metadata
    check(wheel_meta["Root-Is-Purelib"] == "true" and wheel_meta.get_all("Tag") == ["py3-none-any"],
          f"WHEEL: Root-Is-Purelib {wheel_meta['Root-Is-Purelib']}, tags {wheel_meta.get_all('Tag')}")
    check(meta["Name"] == name and meta["Version"] == version, f"METADATA: {meta['Name']} {meta['Version']}")
    check(f'__version__ = "{version}"' in init, f"flashattn.__version__ is not {version}")
    check(meta["Requires-Python"] == project["requires-python"] == ">=3.10",
          f"Requires-Python {meta['Requires-Python']}")
    check(meta["License-Expression"] == project["license"] == "BSD-3-Clause",
          f"License-Expression {meta['License-Expression']}")
    check(meta.get_all("License-File") == ["LICENSE"] and f"{dist_info}/licenses/LICENSE" in names,
          f"License-File {meta.get_all('License-File')}: the wheel must carry LICENSE")
    check(meta["Summary"] == project["description"], "Summary differs from pyproject's description")
    check(meta["Description-Content-Type"] == "text/markdown"
          and meta.get_payload().strip() == (repo_path / "README.md").read_text().strip(),
          "the long description is not README.md as markdown")
    requires = _requirements(meta.get_all("Requires-Dist") or [])
    core = {_key(r) for r in requires if "extra ==" not in str(r.marker or "")}
    check(core == {_key(r) for r in _requirements(project["dependencies"])},
          f"core Requires-Dist {sorted(core)} differs from pyproject's dependencies")
    check({k[0] for k in core} == {"torch", "triton"}, f"core dependencies {sorted(k[0] for k in core)}")
    check(any(k[0] == "triton" and k[3] == 'platform_system == "Linux"' for k in core), "triton is not Linux-only")
    extras = set(meta.get_all("Provides-Extra") or [])
    check(extras == EXTRAS == set(project["optional-dependencies"]), f"Provides-Extra {sorted(extras)}")
    for extra in sorted(extras):
        got = {_key(r) for r in requires if f'extra == "{extra}"' in str(r.marker or "")}
        want = {_key(r) for r in _requirements(project["optional-dependencies"][extra])}
        check(got == want, f"extra {extra}: Requires-Dist {sorted(got)}, pyproject {sorted(want)}")
    print(f"ok: metadata: {name} {version}, Requires-Python {meta['Requires-Python']}, "
          f"License-Expression {meta['License-Expression']} (LICENSE in the wheel), readme README.md (text/markdown)")
    print(f"ok: Requires-Dist: {', '.join(str(r) for r in requires if 'extra ==' not in str(r.marker or ''))}; "
          f"extras: {', '.join(sorted(extras))}")

    # -- files: the checkout's package, module for module, and nothing else
    files = [n for n in names if not n.endswith("/")]
    package = sorted(n for n in files if not n.startswith(dist_info + "/"))
    in_checkout = sorted(p.relative_to(repo_path).as_posix() for p in (repo_path / "flashattn").rglob("*.py")
                         if "__pycache__" not in p.parts)
    check(package == in_checkout, f"the wheel's modules differ from the checkout's flashattn/: "
          f"missing {sorted(set(in_checkout) - set(package))}, extra {sorted(set(package) - set(in_checkout))}")
    for sub in SUBPACKAGES:
        check(f"{sub}/__init__.py" in package, f"{sub} is not in the wheel")
    outside = [n for n in files if n.split("/")[0] not in ("flashattn", dist_info)]
    check(not outside, f"files outside the package: {outside}")
    stray = [n for n in files if {"tests", "benchmarks", "examples", "scripts"} & set(n.split("/")[:-1])]
    check(not stray, f"tests, benchmarks, examples or scripts in the wheel: {stray}")
    compiled = [n for n in files if n.endswith((".so", ".pyd", ".dll", ".dylib", ".pyc"))]
    check(not compiled, f"compiled files in a pure-Python wheel: {compiled}")
    with zipfile.ZipFile(wheel_path) as z:
        unpacked = sum(i.file_size for i in z.infolist())
    print(f"ok: wheel {wheel_path.name}: {wheel_path.stat().st_size / 1e3:.0f} kB "
          f"({unpacked / 1e3:.0f} kB unpacked), {len(files)} files:")
    folders: dict[str, int] = {}
    for n in package:
        folders[n.rsplit("/", 1)[0]] = folders.get(n.rsplit("/", 1)[0], 0) + 1
    for folder, count in sorted(folders.items()):
        print(f"      {folder + '/':28s} {count:2d} modules")
    dist_files = sorted(n.split("/", 1)[1] for n in files if n.startswith(dist_info + "/"))
    print(f"      {dist_info + '/':28s} {', '.join(dist_files)}")

    import tarfile
    with tarfile.open(sdist) as t:
        members = [m.name.split("/", 1)[1] for m in t.getmembers() if "/" in m.name]
    stray = [m for m in members if m.split("/")[0] in ("tests", "benchmarks", "examples", "scripts")]
    check(not stray, f"the sdist holds {stray}")
    check({"pyproject.toml", "README.md", "LICENSE"} <= set(members), "the sdist lacks pyproject.toml, README.md or LICENSE")
    print(f"ok: sdist {Path(sdist).name}: {Path(sdist).stat().st_size / 1e3:.0f} kB, the package, README.md, "
          f"pyproject.toml, LICENSE; no tests")


# ---------------------------------------------------------------------------------------------- link

def link(wheel: str, site: str, deps: str) -> None:
    """Link the wheel's declared dependencies (with their own, recursively) from this environment."""
    from email.parser import Parser
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    with zipfile.ZipFile(wheel) as z:
        meta_name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        meta = Parser().parsestr(z.read(meta_name).decode())
    wanted = []
    for line in meta.get_all("Requires-Dist") or []:
        req = Requirement(line)
        if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in ("", *LINKED_EXTRAS)):
            wanted.append((req, req.marker is None or req.marker.evaluate({"extra": ""})))

    seen: dict[str, metadata.Distribution] = {}
    visited: set[tuple] = set()
    missing_extras = []

    def visit(req, direct: bool) -> None:
        extras = tuple(sorted(req.extras))
        key = canonicalize_name(req.name)
        if (key, extras) in visited:
            return
        visited.add((key, extras))
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            fail(f"{req.name} (required) is not installed in {sys.prefix}; run scripts/setup.sh")
        if direct:   # the wheel's own requirement (the rest is pip's business)
            check(req.specifier.contains(dist.version, prereleases=True),
                  f"{req.name} {dist.version} is installed, the wheel requires {req}")
        seen[key] = dist
        for line in dist.requires or []:
            sub = Requirement(line)
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in ("", *extras)):
                visit(sub, direct=False)

    for req, core in wanted:
        if not core:   # an extra's: linked where installed (the smoke step imports its modules only then)
            try:
                metadata.distribution(req.name)
            except metadata.PackageNotFoundError:
                missing_extras.append(req.name)
                continue
        visit(req, direct=True)

    deps_path = Path(deps)
    deps_path.mkdir(parents=True, exist_ok=True)
    for key, dist in sorted(seen.items()):
        tops = set()
        for f in dist.files or []:
            top = f.parts[0]
            if top in ("..", "__pycache__") or top.endswith(".data"):
                continue   # console scripts, byte code, data installed elsewhere
            tops.add(top)
        check(bool(tops), f"{dist.metadata['Name']}: no RECORD of its files, cannot link it")
        for top in tops:
            source = Path(dist.locate_file(top))
            target = deps_path / top
            if source.exists() and not target.exists():
                target.symlink_to(source.resolve())
    (Path(site) / "_flashattn_wheel_deps.pth").write_text(f"{deps_path}\n")
    direct = {canonicalize_name(req.name) for req, _ in wanted} & set(seen)
    names = ", ".join(f"{seen[k].metadata['Name']} {seen[k].version}" for k in sorted(direct))
    print(f"ok: the clean environment reuses {names} and the {len(seen) - len(direct)} distributions they "
          f"require from {sys.prefix} (linked, not copied: no download)")
    if missing_extras:
        print(f"note: not installed, so their modules are not imported: {', '.join(missing_extras)}")


# ---------------------------------------------------------------------------------------------- smoke

def _naive(q, k, v, causal: bool):
    """softmax(QK^T / sqrt(d)) V in float64, GQA by repeating heads, causal aligned bottom-right."""
    import torch
    q, k, v = (x.double() for x in (q, k, v))
    rep = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / q.shape[-1] ** 0.5
    if causal:
        sq, sk = q.shape[1], k.shape[1]
        scores = scores.masked_fill(torch.ones(sq, sk, dtype=torch.bool).triu(sk - sq + 1), float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)


def _flash_attn_func_matches(flash_attn_func) -> str:
    import torch
    torch.manual_seed(0)
    q = torch.randn(2, 48, 4, 16, requires_grad=True)    # (batch, seqlen_q, nheads, headdim)
    k = torch.randn(2, 64, 2, 16, requires_grad=True)    # GQA: 2 kv heads, seqlen_k > seqlen_q
    v = torch.randn(2, 64, 2, 16, requires_grad=True)
    out = flash_attn_func(q, k, v, causal=True)
    out.backward(torch.ones_like(out))
    grads = [x.grad for x in (q, k, v)]
    for x in (q, k, v):
        x.grad = None
    ref = _naive(q, k, v, causal=True)
    ref.backward(torch.ones_like(ref))
    check(out.shape == q.shape and out.dtype == q.dtype, f"flash_attn_func: {out.shape} {out.dtype}")
    err = (out.double() - ref).abs().max().item()
    gerr = max((g.double() - x.grad.double()).abs().max().item() for g, x in zip(grads, (q, k, v)))
    check(err < 1e-5 and gerr < 1e-4, f"flash_attn_func differs from softmax(QK^T)V: {err:.2e}, grads {gerr:.2e}")
    return f"max error {err:.1e}, gradients {gerr:.1e}"


def _from(path: str, site: Path, repo: Path) -> None:
    p = Path(path).resolve()
    check(p.is_relative_to(site) and not p.is_relative_to(repo), f"{path} is not from the wheel (in {site})")


def smoke(repo: str) -> None:
    import importlib
    import importlib.util
    import pkgutil
    import sysconfig
    from importlib import metadata

    site = Path(sysconfig.get_path("purelib")).resolve()
    repo_path = Path(repo).resolve()
    import flashattn
    _from(flashattn.__file__, site, repo_path)
    dist = metadata.distribution("flashattn")
    check(dist.version == flashattn.__version__, f"installed {dist.version}, flashattn.__version__ "
                                                  f"{flashattn.__version__}")
    _from(str(dist.locate_file("flashattn/__init__.py")), site, repo_path)
    import torch
    print(f"ok: flashattn {flashattn.__version__} imported from the wheel: {flashattn.__file__}; "
          f"torch {torch.__version__} from {Path(torch.__file__).resolve().parents[1]}")

    # -- the public entry points
    for name in flashattn.__all__:
        check(hasattr(flashattn, name), f"flashattn.__all__ names {name}, which flashattn lacks")
    from flashattn import flash_attn_func, flash_attn_with_kvcache, scaled_dot_product_attention
    from flashattn.bert_padding import index_first_axis, pad_input, unpad_input
    from flashattn.nn import FlashAttention, MultiheadAttention
    import flashattn.distributed
    for name in flashattn.distributed.__all__:
        check(hasattr(flashattn.distributed, name), f"flashattn.distributed.__all__ names {name}, which it lacks")
    entry = ["flashattn." + n for n in flashattn.__all__] + [
        "flashattn.nn.FlashAttention", "flashattn.nn.MultiheadAttention", "flashattn.bert_padding.unpad_input",
        "flashattn.bert_padding.pad_input", "flashattn.bert_padding.index_first_axis"] + [
        "flashattn.distributed." + n for n in flashattn.distributed.__all__]
    have = {name: importlib.util.find_spec(name) is not None for names in NEEDS_EXTRA.values() for name in names}
    if have["transformers"]:
        import flashattn.integrations.transformers as fa_hf
        from transformers import AttentionInterface
        check(AttentionInterface._global_mapping.get(fa_hf.ATTN_IMPLEMENTATION) is fa_hf.attention_forward,
              f"{fa_hf.ATTN_IMPLEMENTATION} is not registered with transformers")
        entry.append(f"flashattn.integrations.transformers (registered as {fa_hf.ATTN_IMPLEMENTATION!r})")
    print(f"ok: {len(entry)} entry points: {', '.join(entry)}")

    # -- every module of the package, from the wheel
    imported, skipped = 0, []
    for info in pkgutil.walk_packages(flashattn.__path__, "flashattn."):
        if info.name.rsplit(".", 1)[-1] == "__main__":
            continue   # `python -m flashattn.bench`: running it is the benchmark
        needs = next((mods for prefix, mods in NEEDS_EXTRA.items()
                      if info.name == prefix or info.name.startswith(prefix + ".")), ())
        if not all(have[m] for m in needs):
            skipped.append(info.name)
            continue
        module = importlib.import_module(info.name)
        _from(module.__file__, site, repo_path)
        imported += 1
    for prefix, mods in NEEDS_EXTRA.items():
        if all(have[m] for m in mods):
            check(any(m == prefix or m.startswith(prefix + ".") for m in sys.modules), f"{prefix} not imported")
    print(f"ok: all {imported} modules imported from the wheel"
          + (f"; skipped, their extra not installed: {', '.join(skipped)}" if skipped else ""))

    # -- tiny CPU calls (the PyTorch path)
    print(f"ok: flash_attn_func (2, 48, 4, 16) causal GQA, forward and backward: {_flash_attn_func_matches(flash_attn_func)}")
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 4, 20, 16).unbind(0)     # (batch, heads, seqlen, headdim)
    mask = torch.rand(2, 1, 20, 20) > 0.3
    mask[..., 0] = True
    err = (scaled_dot_product_attention(q, k, v, attn_mask=mask)
           - torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)).abs().max().item()
    check(err < 1e-5, f"scaled_dot_product_attention differs from torch's by {err:.2e}")
    layer = FlashAttention(hidden_size=64, num_heads=4, num_kv_heads=2, causal=True, rotary=True)
    real = torch.arange(12) < torch.tensor([[12], [5]])
    y = layer(torch.randn(2, 12, 64), attention_mask=real)
    check(y.shape == (2, 12, 64) and bool((y[1, 5:] == 0).all()), "FlashAttention: shape or padding")
    x = torch.randn(2, 12, 64)
    y, _ = MultiheadAttention(64, 4, batch_first=True)(x, x, x, need_weights=False)
    check(y.shape == (2, 12, 64), "MultiheadAttention: shape")
    x_packed, indices, cu_seqlens, max_seqlen, _ = unpad_input(torch.randn(2, 12, 4, 16), real)
    check(x_packed.shape == (17, 4, 16) and pad_input(x_packed, indices, 2, 12).shape == (2, 12, 4, 16)
          and index_first_axis(x_packed, indices[:3]).shape == (3, 4, 16), "bert_padding: shapes")
    k_cache, v_cache = torch.zeros(2, 2, 32, 2, 16).unbind(0)
    out = flash_attn_with_kvcache(torch.randn(2, 1, 4, 16), k_cache, v_cache, k=torch.randn(2, 1, 2, 16),
                                  v=torch.randn(2, 1, 2, 16), cache_seqlens=torch.tensor([3, 0], dtype=torch.int32),
                                  causal=True)
    check(out.shape == (2, 1, 4, 16) and bool(k_cache[0, 3].any()) and bool(k_cache[1, 0].any()),
          "flash_attn_with_kvcache: shape, or the new keys not appended")
    print("ok: scaled_dot_product_attention (bool mask) matches torch's; FlashAttention (padded batch), "
          "MultiheadAttention, unpad_input / pad_input / index_first_axis, flash_attn_with_kvcache ran")


def interpret() -> None:
    import os
    check(os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("FLASHATTN_BACKEND") == "triton",
          "run with TRITON_INTERPRET=1 FLASHATTN_BACKEND=triton")
    import flashattn.ops.triton
    from flashattn import flash_attn_func
    result = _flash_attn_func_matches(flash_attn_func)
    print(f"ok: flash_attn_func through the wheel's Triton kernels ({Path(flashattn.ops.triton.__file__).parent}, "
          f"Triton's interpreter), forward and backward: {result}")


def notriton() -> None:
    class NoTriton:   # as where triton is not installed: the wheel requires it on Linux only
        @staticmethod
        def find_spec(name, path=None, target=None):
            if name == "triton" or name.startswith("triton."):
                raise ModuleNotFoundError(f"No module named {name!r} (hidden)", name=name)

    sys.meta_path.insert(0, NoTriton)
    import flashattn
    import flashattn.bert_padding
    import flashattn.nn
    result = _flash_attn_func_matches(flashattn.flash_attn_func)
    check(not any(m == "triton" or m.startswith("triton.") for m in sys.modules), "triton was imported")
    print(f"ok: without triton (not required off Linux) flashattn, flashattn.nn and flashattn.bert_padding import "
          f"and flash_attn_func runs on the PyTorch path: {result}")


if __name__ == "__main__":
    command, args = sys.argv[1], sys.argv[2:]
    {"inspect": inspect, "link": link, "smoke": smoke, "interpret": interpret, "notriton": notriton}[command](*args)
