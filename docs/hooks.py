"""MkDocs hooks: pages generated from the repository at build time.

- one page per file in ``configs/`` (its leading comment as prose, then the file itself),
  listed in the nav under "Configs";
- the CLI reference: ``reference/cli.md`` holds the marker ``<!-- cli-help -->``, replaced by
  the ``--help`` of every subcommand, captured from the CLI itself in one subprocess.

Run as a script (``python docs/hooks.py OUT.json``) it writes that help text as JSON; the
build calls it so that importing torch and Lightning stays out of the MkDocs process.
"""

from __future__ import annotations

import html
import json
import os
import posixpath
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
CLI_MARKER = "<!-- cli-help -->"

# (heading, arguments after `python -m gs_lightning`); each is one section of the CLI page.
HELP_COMMANDS: list[tuple[str, list[str]]] = [
    ("python -m gs_lightning", ["--help"]),
    *[(f"python -m gs_lightning {sub}", [sub, "--help"])
      for sub in ("fit", "validate", "harvest", "evaluate", "export", "sweep", "suite", "browse")],
    *[(f"fit --model.sae.help gs_lightning.saes.{name}", ["fit", "--model.sae.help", f"gs_lightning.saes.{name}"])
      for name in ("JumpReLUSAE", "JumpReLU2025SAE", "ReLUSAE", "TopKSAE", "BatchTopKSAE",
                   "MatryoshkaBatchTopKSAE", "MatryoshkaJumpReLUSAE", "GatedSAE", "CrossLayerTranscoder", "Crosscoder")],
    *[(f"fit --data.help gs_lightning.data.{name}", ["fit", "--data.help", f"gs_lightning.data.{name}"])
      for name in ("LiveActivationDataModule", "ShardedActivationDataModule", "AlignedShardsDataModule",
                   "SyntheticActivationDataModule", "TensorActivationDataModule")],
]
HELP_COLUMNS = "90"  # argparse wraps help at $COLUMNS: a fixed width keeps the page stable


# ---------------------------------------------------------------- config pages


def config_files() -> list[Path]:
    """Every YAML and JSON under ``configs/``: top-level files first, then each subfolder's."""
    files = [p for p in CONFIGS.rglob("*") if p.suffix in (".yaml", ".yml", ".json")]
    return sorted(files, key=lambda p: (len(p.relative_to(CONFIGS).parts), str(p.relative_to(CONFIGS))))


def config_page(path: Path) -> str:
    """The page of one config file, relative to docs/: ``configs/sweeps/x.yaml`` -> ``configs/sweeps/x.md``."""
    return "configs/" + path.relative_to(CONFIGS).with_suffix(".md").as_posix()


def generated_pages() -> list[str]:
    """Every page this hook adds, relative to docs/ (the docs test accepts links to them)."""
    return [config_page(p) for p in config_files()]


def leading_comment(text: str) -> list[str]:
    """The comment lines at the top of a YAML file, without their ``#``."""
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        lines.append(line[1:].removeprefix(" "))
    return lines


def _link(target: str, page: str) -> str:
    """A relative link from ``page`` (relative to docs/) to a repository path it names."""
    if target.startswith("docs/"):
        doc = target.removeprefix("docs/")
    else:  # a config file: its generated page
        doc = config_page(ROOT / target)
    return posixpath.relpath(doc, posixpath.dirname(page))


_PATH = re.compile(r"(?<![\w/])((?:docs/[\w/.-]+\.md)|(?:configs/[\w/.-]+\.(?:yaml|json)))")


def _prose(line: str, page: str) -> str:
    """One comment line as Markdown: HTML, ``*`` and ``_`` escaped outside code spans, and
    repository paths that exist turned into links (one that does not stays text)."""
    parts = re.split(r"(`[^`]*`)", line)
    for i, part in enumerate(parts):
        if i % 2:  # a code span: kept as written, linked when it is exactly a path
            inner = part.strip("`")
            if _PATH.fullmatch(inner) and (ROOT / inner).exists():
                parts[i] = f"[{part}]({_link(inner, page)})"
            continue
        pieces = _PATH.split(part)  # odd pieces are paths
        for j, piece in enumerate(pieces):
            if j % 2 and (ROOT / piece).exists():
                pieces[j] = f"[`{piece}`]({_link(piece, page)})"
            else:
                pieces[j] = html.escape(piece, quote=False).replace("*", r"\*").replace("_", r"\_")
        parts[i] = "".join(pieces)
    return "".join(parts)


def comment_markdown(lines: list[str], page: str) -> str:
    """The leading comment as Markdown: indented lines (commands) become a bash block,
    blank comment lines separate paragraphs, the rest is prose."""
    blocks: list[str] = []
    prose: list[str] = []
    code: list[str] = []

    def flush() -> None:
        if prose:
            blocks.append(_prose(" ".join(prose), page))
            prose.clear()
        if code:
            blocks.append("```bash\n" + "\n".join(code) + "\n```")
            code.clear()

    for line in lines:
        if line.startswith("  ") and line.strip():
            if prose:
                flush()
            code.append(line.strip())
        elif not line.strip():
            flush()
        else:
            if code:
                flush()
            prose.append(line)
    flush()
    return "\n\n".join(blocks)


def _users(path: Path) -> list[Path]:
    """The other configs that name ``path`` (a model's config.json: the suite that reads it)."""
    rel = path.relative_to(ROOT).as_posix()
    return [p for p in config_files() if p != path and rel in p.read_text()]


def config_markdown(path: Path) -> str:
    """The whole generated page of one config file."""
    rel = path.relative_to(ROOT).as_posix()
    page = config_page(path)
    text = path.read_text()
    parts = [f"# {path.relative_to(CONFIGS).as_posix()}"]
    comment = leading_comment(text) if path.suffix != ".json" else []
    if comment:
        parts.append(comment_markdown(comment, page))
    users = _users(path)
    if users:
        parts.append("Named in " + ", ".join(f"[`{u.relative_to(ROOT).as_posix()}`]({_link(u.relative_to(ROOT).as_posix(), page)})"
                                            for u in users) + ".")
    language = "json" if path.suffix == ".json" else "yaml"
    parts += [f"The file, `{rel}`:", f'```{language} title="{rel}"\n{text.rstrip()}\n```']
    return "\n\n".join(parts) + "\n"


def on_config(config: Any) -> Any:
    """Put the generated config pages under the nav's "Configs" entry."""
    pages = [{p.relative_to(CONFIGS).as_posix(): config_page(p)} for p in config_files()]

    def expand(items: list[Any]) -> None:  # the "Configs" entry, at any depth of the nav
        for i, item in enumerate(items):
            if isinstance(item, dict) and item.get("Configs") == "configs/index.md":
                items[i] = {"Configs": ["configs/index.md", *pages]}
            elif isinstance(item, dict):
                for value in item.values():
                    if isinstance(value, list):
                        expand(value)

    expand(config["nav"] or [])
    return config


def on_files(files: Any, config: Any) -> Any:
    """Add one generated page per config file."""
    from mkdocs.structure.files import File

    for path in config_files():
        files.append(File.generated(config, config_page(path), content=config_markdown(path)))
    return files


# ---------------------------------------------------------------- CLI reference

_help_cache: dict[str, str] | None = None


def cli_help() -> dict[str, str]:
    """``--help`` of every command in HELP_COMMANDS, from one subprocess (cached per process)."""
    global _help_cache
    if _help_cache is None:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "help.json"
            env = {**os.environ, "COLUMNS": HELP_COLUMNS}
            subprocess.run([sys.executable, __file__, str(out)], check=True, cwd=ROOT, env=env,
                           stdout=subprocess.DEVNULL)
            _help_cache = json.loads(out.read_text())
    return _help_cache


def cli_markdown(helps: dict[str, str]) -> str:
    """One section per command: its heading and its help text."""
    groups = {"python": "### Subcommands", "fit --model.sae.help": "### SAE variants' options",
              "fit --data.help": "### Data sources' options"}
    sections = []
    for heading, _ in HELP_COMMANDS:
        for prefix, title in list(groups.items()):
            if heading.startswith(prefix):
                sections.append(title)
                del groups[prefix]
        sections.append(f"#### `{heading}`\n\n```text\n{helps[heading].rstrip()}\n```")
    return "\n\n".join(sections)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """Fill the CLI page's marker with the captured help."""
    if CLI_MARKER in markdown:
        markdown = markdown.replace(CLI_MARKER, cli_markdown(cli_help()))
    return markdown


_RST_ROLE = re.compile(r":(?:class|mod|func|meth|attr|data|obj|exc):<code>~?")


def on_page_content(html_text: str, page: Any, config: Any, files: Any) -> str:
    """Docstrings write Sphinx roles (``:class:`SAE` ``); show them as plain code."""
    return _RST_ROLE.sub("<code>", html_text)


def _capture_help(out: Path) -> None:
    """Run each HELP_COMMANDS entry in this process and write {heading: help text} to ``out``."""
    import contextlib
    import io

    sys.argv = ["python -m gs_lightning"]  # nested helps (--model.sae.help) name sys.argv[0]
    from gs_lightning.cli import main

    helps = {}
    for heading, args in HELP_COMMANDS:
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            try:
                main(args)
            except SystemExit as stop:
                if stop.code not in (0, None):
                    raise RuntimeError(f"{heading} exited {stop.code}") from None
        helps[heading] = buffer.getvalue()
    out.write_text(json.dumps(helps))


if __name__ == "__main__":
    _capture_help(Path(sys.argv[1]))
