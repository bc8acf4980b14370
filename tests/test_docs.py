"""The docs' commands are real: every ``python -m gs_lightning ...`` (or ``gs-lightning ...``)
line in a bash block of README.md, docs/**/*.md and the configs' leading comments (which
become the config pages) is checked against the code, and a few run end to end.

A command is checked in its cheapest complete form, in-process: ``fit``/``validate`` and
the other subcommands with ``--print_config`` (jsonargparse parses and validates every key
and type, then exits), each run of a ``sweep`` spec as the ``fit`` it would start, a
``suite`` through its parser and, with ``--plan``, for real. Also: every ``configs/...``
path and every relative link the docs name exists, and the README stays one screen long
and starts with the quickstart and the CI test command.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from gs_lightning.cli import EXTRA_SUBCOMMANDS, main

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOC_FILES = [README, *sorted((ROOT / "docs").rglob("*.md"))]
SUBCOMMANDS = {"fit", "validate", *EXTRA_SUBCOMMANDS}
QUICKSTART = ("python3 -m venv .venv && .venv/bin/pip install -c constraints-cpu.txt -e . && "
              ".venv/bin/python -m gs_lightning fit --config configs/quickstart.yaml")
README_MAX_BYTES = 6 * 1024


def _load_hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "docs" / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


HOOKS = _load_hooks()


def bash_blocks(markdown: str) -> list[str]:
    return re.findall(r"^```bash\n(.*?)\n```", markdown, re.DOTALL | re.MULTILINE)


@dataclass(frozen=True)
class DocCommand:
    source: str  # file it was found in
    line: str  # the shell line, as written
    args: tuple[str, ...]  # what follows `python -m gs_lightning`

    def __str__(self) -> str:
        return f"{self.source}: {self.line}"


def gs_commands(block: str, source: str) -> list[DocCommand]:
    """The gs_lightning invocations of one bash block (``&&`` chains and comments allowed)."""
    found = []
    for line in block.replace("\\\n", " ").splitlines():
        for part in line.split("&&"):
            tokens = shlex.split(part, comments=True)
            for i, token in enumerate(tokens):
                if token == "-m" and tokens[i + 1:i + 2] == ["gs_lightning"]:
                    args = tokens[i + 2:]
                elif token in ("gs-lightning", "gs-lightning-tpu") and tokens[i + 1:i + 2] and tokens[i + 1] in SUBCOMMANDS:
                    args = tokens[i + 1:]  # the console script, or a Docker image whose entry point it is
                else:
                    continue
                found.append(DocCommand(source, line.strip(), tuple(args)))
                break
    return found


def config_comment_blocks() -> list[tuple[str, str]]:
    """(config file, bash block) of the configs' leading comments, as their pages show them."""
    blocks = []
    for path in HOOKS.config_files():
        lines = HOOKS.leading_comment(path.read_text()) if path.suffix != ".json" else []
        for block in bash_blocks(HOOKS.comment_markdown(lines, HOOKS.config_page(path))):
            blocks.append((path.relative_to(ROOT).as_posix(), block))
    return blocks


def all_doc_commands() -> list[DocCommand]:
    commands = []
    for path in DOC_FILES:
        for block in bash_blocks(path.read_text()):
            commands += gs_commands(block, path.relative_to(ROOT).as_posix())
    for source, block in config_comment_blocks():
        commands += gs_commands(block, source)
    return commands


COMMANDS = all_doc_commands()


@pytest.fixture
def in_repo(monkeypatch: pytest.MonkeyPatch) -> None:
    """As a shell at the repository root: relative paths resolve and `python -m` finds `tests`."""
    import huggingface_hub.constants

    monkeypatch.chdir(ROOT)
    monkeypatch.syspath_prepend(str(ROOT))
    # A plan of a hub model falls back to its bundled config.json without retrying the hub.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def _exits_cleanly(args: list[str], capsys: pytest.CaptureFixture[str], why: str) -> str:
    """Run the CLI with ``args``; it must end with exit status 0 (or return). Its stdout."""
    try:
        main(args)
    except SystemExit as stop:
        captured = capsys.readouterr()
        assert stop.code in (0, None), f"{why}\n  ran: {shlex.join(args)}\n{captured.err[-2000:]}"
        return captured.out
    return capsys.readouterr().out


def _is_help(args: tuple[str, ...]) -> bool:
    return any(a in ("-h", "--help", "--print_config") or a.endswith(".help") for a in args)


def check_command(command: DocCommand, capsys: pytest.CaptureFixture[str]) -> None:
    """Check one documented command without running what it would run (see the module docstring)."""
    args = list(command.args)
    assert args and args[0] in SUBCOMMANDS, f"{command}: not a subcommand of python -m gs_lightning"
    if _is_help(command.args):
        _exits_cleanly(args, capsys, str(command))
    elif args[0] == "suite":
        from gs_lightning.suite.cli import build_parser, config_from

        try:
            parsed = build_parser().parse_args(args[1:])
        except SystemExit:
            pytest.fail(f"{command}\n{capsys.readouterr().err[-2000:]}")
        config_from(parsed)
        if parsed.plan:  # reads only the model's config: cheap
            assert "plan:" in _exits_cleanly(args, capsys, str(command))
    else:
        printed = _exits_cleanly(args + ["--print_config"], capsys, str(command))
        if args[0] == "sweep":
            check_sweep(yaml.safe_load(printed), command, capsys)


def check_sweep(options: dict, command: DocCommand, capsys: pytest.CaptureFixture[str]) -> None:
    """Each run a local sweep would start, and its packed form, parses as a ``fit``."""
    from gs_lightning.sweep import (
        base_args,
        load_spec,
        packed_name,
        run_args,
        suggestions,
    )

    spec = load_spec(options["spec"])
    runs = suggestions(spec, options.get("count"), options.get("seed", 0))
    base = base_args(spec, options["spec"])
    for run in runs:
        _exits_cleanly(["fit", *base, *run_args(run), "--print_config"], capsys, f"{command}: run {run}")
    names = {key: packed_name(key) for key in spec["parameters"]}
    if len(runs) > 1 and all(names.values()):
        members = {names[k]: [run[k] for run in runs] for k in spec["parameters"]}
        _exits_cleanly(["fit", *base, f"--model.sweep={json.dumps(members)}", "--print_config"], capsys,
                       f"{command}: packed")


def test_the_docs_hold_commands() -> None:
    # The extraction itself: the quickstart, each subcommand, the config comments, Docker.
    sources = {c.source for c in COMMANDS}
    assert {"README.md", "docs/getting-started.md", "docs/guide/docker.md", "configs/quickstart.yaml"} <= sources
    assert {c.args[0] for c in COMMANDS} >= {"fit", "validate", "harvest", "evaluate", "export", "sweep", "suite"}


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: f"{c.source}:{' '.join(c.args)[:80]}")
def test_documented_command_is_valid(command: DocCommand, in_repo: None, capsys: pytest.CaptureFixture[str]) -> None:
    check_command(command, capsys)


def test_a_wrong_key_in_a_documented_command_fails(in_repo: None, capsys: pytest.CaptureFixture[str]) -> None:
    # The check can fail: a misspelt option, a wrong value, a missing config.
    broken = [
        ("fit", "--config", "configs/quickstart.yaml", "--model.sae.init_args.sparsity_coeficient", "0.003"),
        ("fit", "--config", "configs/quickstart.yaml", "--trainer.max_stepz", "5"),
        ("harvest", "--config", "configs/harvest_quickstart.yaml", "--max_tokenz", "5"),
        ("export", "--sae", "runs/x/sae", "--format", "gemma_scopes", "--out", "release"),
        ("fit", "--config", "configs/no_such_config.yaml"),
        ("suite", "--config", "configs/suite_quickstart.yaml", "--plann"),
    ]
    for args in broken:
        with pytest.raises(BaseException):  # pytest's Failed or an error from the parser
            check_command(DocCommand("test", shlex.join(args), args), capsys)


CONFIG_PATH = re.compile(r"(?<![\w/])configs/[\w/.-]*\.(?:yaml|json)")


def _template(path: str) -> bool:
    """``configs/X.yaml``, ``configs/suite_X.yaml``: a placeholder, not a file."""
    return bool(re.search(r"(^|[/_])X\.(yaml|json)$", path))


def test_every_config_path_the_docs_name_exists() -> None:
    missing = []
    for path in DOC_FILES:
        for name in CONFIG_PATH.findall(path.read_text()):
            if not _template(name) and not (ROOT / name).is_file():
                missing.append(f"{path.relative_to(ROOT)}: {name}")
    for source, block in config_comment_blocks():
        missing += [f"{source}: {name}" for name in CONFIG_PATH.findall(block) if not (ROOT / name).is_file()]
    assert not missing, missing


def test_every_config_has_a_row_in_the_configs_page() -> None:
    index = (ROOT / "docs" / "configs" / "index.md").read_text()
    for path in HOOKS.config_files():
        rel = path.relative_to(ROOT).as_posix()
        page = HOOKS.config_page(path).removeprefix("configs/")
        assert f"]({page})" in index, f"docs/configs/index.md does not link {rel}'s page ({page})"


LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def test_every_relative_link_resolves() -> None:
    generated = {ROOT / "docs" / page for page in HOOKS.generated_pages()}
    broken = []
    for path in DOC_FILES:
        text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.DOTALL | re.MULTILINE)  # links in code are text
        for target in LINK.findall(text):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            resolved = (path.parent / target.split("#")[0]).resolve()
            if not resolved.exists() and resolved not in generated:
                broken.append(f"{path.relative_to(ROOT)}: {target}")
    assert not broken, broken


def test_the_readme_is_one_screen_and_starts_with_the_two_commands() -> None:
    readme = README.read_text()
    assert len(readme.encode()) < README_MAX_BYTES, f"README.md is {len(readme.encode())} bytes"
    first, second = bash_blocks(readme)[:2]
    assert first == QUICKSTART
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert second in ci, "the README's test command is not a line of .ci/run"
    assert readme.index(first) < readme.index(second) < readme.index("![")  # then the picture
    assert (ROOT / "docs" / "assets" / "frontier.png").stat().st_size < 200_000
    # The getting-started page repeats the two commands verbatim.
    assert bash_blocks((ROOT / "docs" / "getting-started.md").read_text())[:2] == [first, second]


def test_config_page_shows_the_comment_and_the_file() -> None:
    page = HOOKS.config_markdown(ROOT / "configs" / "quickstart_sweep.yaml")
    text = (ROOT / "configs" / "quickstart_sweep.yaml").read_text()
    assert page.startswith("# quickstart_sweep.yaml\n")
    assert "```bash\npython -m gs_lightning fit --config configs/quickstart_sweep.yaml\n```" in page
    assert r"&lt;log\_dir&gt;" in page  # prose is escaped: <log_dir> is not an HTML tag
    assert text.rstrip() in page


@pytest.mark.slow
def test_the_readme_quickstart_runs_and_its_sae_exports(in_repo: None, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    # The README's first command, shortened to 3 steps, then the docs' export commands on its SAE.
    (quickstart,) = [c for c in gs_commands(bash_blocks(README.read_text())[0], "README.md")]
    main([*quickstart.args, "--trainer.max_steps", "3", "--trainer.default_root_dir", str(tmp_path / "qs")])
    out = capsys.readouterr().out
    sae = tmp_path / "qs" / "lightning_logs" / "version_0" / "sae"
    assert "final (step 3)" in out and (sae / "sae.safetensors").is_file()
    exports = [c for c in COMMANDS if c.args[0] == "export"]
    assert {c.args[c.args.index("--format") + 1] for c in exports} == {"gemma_scope", "saelens", "circuit_tracer"}
    # circuit_tracer takes a cross-layer transcoder (tests/test_circuit_tracer_export.py runs that command).
    exports = [c for c in exports if "circuit_tracer" not in c.args]
    from gs_lightning import load_sae

    for i, command in enumerate(exports):
        args = list(command.args)
        args[args.index("--sae") + 1] = str(sae)
        args[args.index("--out") + 1] = str(tmp_path / f"release_{i}")
        (written,) = main(args)
        assert load_sae(written).W_dec.shape == (2048, 128)


def test_the_cli_reference_covers_every_subcommand_and_variant() -> None:
    # docs/hooks.py lists what it captures --help of; a new subcommand or variant must join it.
    from gs_lightning import saes
    from gs_lightning.saes.base import SAE

    documented = {args[0] for _, args in HOOKS.HELP_COMMANDS if args and not args[0].startswith("-")}
    assert {"fit", "validate", *EXTRA_SUBCOMMANDS} <= documented
    variants = {name for name in saes.__all__ if isinstance(getattr(saes, name), type)
                and issubclass(getattr(saes, name), SAE) and name not in ("SAE", "PackedSAE")}
    helped = {args[2].rsplit(".", 1)[1] for _, args in HOOKS.HELP_COMMANDS if args[:2] == ["fit", "--model.sae.help"]}
    assert variants <= helped
