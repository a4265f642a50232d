"""The report's files from its results: paper.json (written by cli.py after every section), paper.md,
each section's PNG and paper.png, the summary figure of every section that ran. Everything here is a
function of paper.json, so a report can be rebuilt without measuring (--render)."""
from __future__ import annotations

import json
from pathlib import Path

from flashattn.bench.paper import exact, gpt2, hbm, layer, memory, sparse, speed

SECTIONS = (exact, hbm, memory, speed, sparse, gpt2, layer)       # the report's order
KEYS = tuple(s.KEY for s in SECTIONS)
BY_KEY = {s.KEY: s for s in SECTIONS}
SCHEMA_VERSION = 1
JSON_NAME, MARKDOWN_NAME, SUMMARY_NAME = "paper.json", "paper.md", "paper.png"


def write_json(results: dict, out: Path) -> Path:
    path = out / JSON_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    tmp.replace(path)          # a run cut short leaves the last complete file
    return path


def load_json(out: Path) -> dict | None:
    path = out / JSON_NAME
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    return data if data.get("schema_version") == SCHEMA_VERSION else None


def _versions(env: dict) -> str:
    text = f"torch {env.get('torch')}, triton {env.get('triton')}"
    if env.get("cuda"):
        text += f", CUDA {env['cuda']}, cuDNN {env.get('cudnn')}"
    return text


def _commit(env: dict) -> str:
    git = env.get("git") or {}
    return (git.get("commit") or "unknown")[:12] + (" (dirty)" if git.get("dirty") else "")


def _commands(results: dict) -> str:
    """The command(s) that measured the sections: one, or each with the sections it measured (a report
    merged from several runs)."""
    default = results.get("command", "python -m flashattn.bench paper")
    by: dict[str, list[str]] = {}
    for key in KEYS:
        entry = results["sections"].get(key, {})
        if entry.get("status") == "ok":
            by.setdefault(entry.get("command", default), []).append(key)
    if len(by) <= 1:
        return f"`{next(iter(by), default)}`"
    return ", ".join(f"`{cmd}` ({', '.join(keys)})" for cmd, keys in by.items()) + ", merged into one report"


def markdown(results: dict) -> str:
    env = results["environment"]
    sections = results["sections"]
    lines = ["# The FlashAttention paper's claims, measured on flashattn", "",
             f"{env['device']}; {_versions(env)}; commit {_commit(env)}; {env['date_utc']}.", "",
             "Each section states a claim of Dao et al., *FlashAttention: Fast and Memory-Efficient Exact Attention "
             "with IO-Awareness* (NeurIPS 2022), the figure measured here, and where the two differ and why. Every "
             "section measures ours (flashattn) beside standard attention, the paper's baseline (matmul, softmax, "
             "matmul in PyTorch: `flashattn.bench.peers.standard_attention`), and beside torch's "
             f"`F.scaled_dot_product_attention` (SDPA), in the same run. Produced by {_commands(results)}; the "
             f"numbers behind it are in [{JSON_NAME}]({JSON_NAME}).", ""]
    lines += ["| | section | status | time |", "| ---: | :--- | :--- | ---: |"]
    for i, key in enumerate(KEYS, 1):
        entry = sections.get(key, {"status": "not run"})
        seconds = f"{entry['seconds']:.0f} s" if entry.get("seconds") is not None else "-"
        lines.append(f"| {i} | [{BY_KEY[key].TITLE}](#{i}-{_anchor(BY_KEY[key].TITLE)}) | "
                     f"{_status(entry)} | {seconds} |")
    if any(e.get("status") == "ok" for e in sections.values()):
        lines += ["", f"![the claims at a glance]({SUMMARY_NAME})"]
    for i, section in enumerate(SECTIONS, 1):
        entry = sections.get(section.KEY, {"status": "not run", "reason": "not selected"})
        lines += ["", f"## {i}. {section.TITLE}", "", f"**Claim** (the paper): {section.CLAIM}", ""]
        own = entry.get("environment") or {}
        if own and own.get("device") != env.get("device"):
            lines += [f"*Measured on {own['device']} ({_commit(own)}, {own.get('date_utc')}).*", ""]
        if entry["status"] == "ok":
            lines.append(section.markdown(entry["data"], own or env).rstrip())
        elif entry["status"] == "skipped":
            lines.append(f"*Skipped: {entry['reason']}.*")
        elif entry["status"] == "error":
            lines.append(f"*Failed: `{entry['reason']}` (see the run's log).*")
        else:
            lines.append(f"*Not run: {entry.get('reason', 'not selected')}.*")
    return "\n".join(lines) + "\n"


def _status(entry: dict) -> str:
    status = entry.get("status", "not run")
    if status == "ok":
        return "measured"
    return f"{status}: {entry.get('reason', '')}".rstrip(": ")


def _anchor(title: str) -> str:
    """GitHub's heading anchor (lowercase, punctuation dropped, spaces to hyphens), after "N. "."""
    kept = "".join(ch for ch in title.lower() if ch.isalnum() or ch in " -_")
    return kept.replace(" ", "-")


def write_markdown(results: dict, out: Path) -> Path:
    path = out / MARKDOWN_NAME
    path.write_text(markdown(results))
    return path


def write_plots(results: dict, out: Path, keys: tuple[str, ...] = KEYS) -> list[Path]:
    """Each measured section's PNG (those in `keys`) and the summary figure."""
    from flashattn.bench import plots  # noqa: F401  (matplotlib, Agg: files only)
    written = []
    for key in keys:
        entry = results["sections"].get(key, {})
        if entry.get("status") == "ok":
            written += [out / name for name in BY_KEY[key].plot(entry["data"], out)]
    summary = write_summary(results, out)
    return written + ([summary] if summary else [])


def write_summary(results: dict, out: Path) -> Path | None:
    """One panel per measured section that has one (the key plot the README shows)."""
    import matplotlib.pyplot as plt
    drawn = [(s, results["sections"][s.KEY]["data"]) for s in SECTIONS
             if hasattr(s, "panel") and results["sections"].get(s.KEY, {}).get("status") == "ok"]
    if not drawn:
        return None
    cols = min(3, len(drawn))
    rows = (len(drawn) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 4.2 * rows), squeeze=False)
    for ax, (section, data) in zip(axes.flat, drawn):
        section.panel(ax, data)
    for ax in list(axes.flat)[len(drawn):]:
        ax.axis("off")
    env = results["environment"]
    fig.suptitle(f"FlashAttention's claims, measured on flashattn - {env['device']}", fontsize=11)
    fig.tight_layout()
    path = out / SUMMARY_NAME
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
