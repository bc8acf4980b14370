"""The format registry: a format defined outside the package is one class and one
``register`` call, and then ``export`` writes it and ``load_sae`` reads it back; the
registry's names are the CLI's choices, in ``load_sae``'s sniffing order."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from gs_lightning import formats
from gs_lightning.cli import main
from gs_lightning.errors import ConfigError
from gs_lightning.formats.export import export, export_gemma_scope_2
from gs_lightning.formats.files import read_safetensors, write_folder
from gs_lightning.formats.io import load_sae, save_sae
from gs_lightning.formats.jumprelu import (
    build_jumprelu,
    check_jumprelu,
    jumprelu_tensors,
)
from gs_lightning.saes import SAE, TopKSAE
from tests.test_export import _trained_like_jumprelu

TOY_FILE = "toy.safetensors"


class Toy(formats.Format):
    """A made-up format: one site's JumpReLU tensors in ``toy.safetensors``."""

    name = "toy"
    description = "toy.safetensors folder (a test's format)"

    def claims(self, path: Path) -> bool:
        return (path / TOY_FILE).is_file()

    def read(self, path: Path) -> SAE:
        return build_jumprelu(read_safetensors(path / TOY_FILE), path / TOY_FILE)

    def check(self, sae: SAE) -> None:
        check_jumprelu(sae, self.name)

    def write(self, sae: SAE, path: Path, **options: Any) -> Path:
        self.check(sae)
        return write_folder(path, {TOY_FILE: jumprelu_tensors(sae)})


@pytest.fixture
def toy() -> Iterator[formats.Format]:
    fmt = formats.register(Toy())
    yield fmt
    formats.unregister(fmt.name)


def _cli_choices(capsys: pytest.CaptureFixture[str]) -> list[str]:
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    return re.search(r"--format \{([^}]*)\}", capsys.readouterr().out).group(1).split(",")


def test_a_format_from_outside_exports_and_loads_back(toy: formats.Format, tmp_path: Path) -> None:
    sae = _trained_like_jumprelu()
    saved = save_sae(sae, tmp_path / "run" / "sae", input_scale=0.5, metadata={"site": "blocks.1.hook_resid_post"})
    [written] = export(str(saved), "toy", str(tmp_path / "toy"))
    assert written == tmp_path / "toy" and formats.format_for(written) is toy
    back = load_sae(written)
    x = torch.randn(32, 16)
    # The scale was folded at save: the toy folder maps raw activations as the SAE mapped scaled ones.
    torch.testing.assert_close(back.encode(x), sae.encode(0.5 * x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(back(x), sae(0.5 * x) / 0.5, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(back.encode(x), load_sae(saved).encode(x), rtol=0, atol=0)


def test_a_registered_format_is_a_cli_choice(toy: formats.Format, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli_choices(capsys)[-1] == "toy"
    saved = save_sae(_trained_like_jumprelu(), tmp_path / "sae")
    [written] = main(["export", "--sae", str(saved), "--format", "toy", "--out", str(tmp_path / "out")])
    assert load_sae(written).d_sae == 64


def test_a_format_refuses_what_it_cannot_hold(toy: formats.Format, tmp_path: Path) -> None:
    saved = save_sae(TopKSAE(16, 64, k=4), tmp_path / "topk")
    with pytest.raises(ConfigError, match=rf"{saved}: TopKSAE cannot be written as a JumpReLU.*keep gs_lightning's own"):
        export(str(saved), "toy", str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_registry_names_are_the_cli_choices(capsys: pytest.CaptureFixture[str]) -> None:
    assert formats.names() == ["gemma_scope_2", "native", "gemma_scope", "saelens", "circuit_tracer"]
    assert _cli_choices(capsys) == formats.export_names() == ["gemma_scope_2", "gemma_scope", "saelens",
                                                              "circuit_tracer"]


def test_an_unknown_format_names_the_registered_ones(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    saved = save_sae(_trained_like_jumprelu(), tmp_path / "sae")
    with pytest.raises(ConfigError, match="unknown format 'gemma_scopes'; export writes gemma_scope_2, gemma_scope, "
                                          "saelens, circuit_tracer"):
        export(str(saved), "gemma_scopes", str(tmp_path / "out"))
    with pytest.raises(ConfigError, match="unknown format 'nope'; the registered formats are gemma_scope_2, native"):
        formats.get("nope")
    with pytest.raises(SystemExit) as stop:  # the CLI refuses it while parsing
        main(["export", "--sae", str(saved), "--format", "gemma_scopes", "--out", str(tmp_path / "out")])
    assert stop.value.code != 0 and "gemma_scope_2" in capsys.readouterr().err


def test_sniffing_follows_the_registration_order(tmp_path: Path) -> None:
    # A Gemma Scope 2 folder holds a config.json too: it is asked before gs_lightning's own.
    sae = _trained_like_jumprelu()
    gs2 = export_gemma_scope_2(sae, tmp_path, layer=1, average_l0=5, metadata={"site": "blocks.1.hook_resid_post"})
    assert (gs2.parent / "config.json").is_file()
    assert formats.format_for(gs2.parent).name == "gemma_scope_2"
    assert formats.format_for(save_sae(sae, tmp_path / "ours")).name == "native"
    # Nothing claims an empty folder: gs_lightning's own reader names the missing file.
    with pytest.raises(ConfigError, match="config.json is missing"):
        load_sae(tmp_path / "empty")
