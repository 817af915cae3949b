"""What an evaluation scores: the validation split of the run a model came from, or any text (files
or folders of .txt, .jsonl, .jsonl.gz; the bundled held-out register), which is prepared on the fly
as a dataset that holds every document in its validation split, with the model's own tokenizer,
segmentation and sentence/passage limits, into the model's data cache. Nothing here trains on it."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from sllm.training.config import DataConfig
from sllm.training.data.corpus import heldout_dir


@dataclass(frozen=True)
class TextSource:
    paths: tuple[str, ...] = ()  # empty: the run's own validation split
    label: str = "validation"

    def data_config(self, data: DataConfig, tokenizer: str | Path) -> DataConfig:
        """The model's data settings pointed at this text, tokenized with `tokenizer` (the model's)."""
        if not self.paths:
            return dataclasses.replace(data, tokenizer=str(tokenizer))
        # val_fraction 1: every document is evaluation text (prepare.PrepareConfig)
        return dataclasses.replace(data, dataset="", corpus=list(self.paths), val_fraction=1.0,
                                   tokenizer=str(tokenizer))


VALIDATION = TextSource()


def text_files(paths: list[str | Path]) -> TextSource:
    return TextSource(tuple(str(p) for p in paths), "text " + ", ".join(str(p) for p in paths))


def heldout_register() -> TextSource:
    """The bundled held-out register (data/heldout): a whole register no training run reads."""
    folder = heldout_dir()
    return TextSource((str(folder),), f"held-out register ({', '.join(p.name for p in sorted(folder.glob('*.jsonl.gz')))})")


def choose(text: list[Path] | None, heldout: bool) -> TextSource:
    """The text a command's --text / --heldout options name (the validation split when neither)."""
    if text and heldout:
        raise ValueError("--text and --heldout name two different texts: give one")
    if heldout:
        return heldout_register()
    return text_files(text) if text else VALIDATION
