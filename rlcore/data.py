"""Prompts from datasets: sources, templates, validation, and a resumable sampler.

Two sources: `reasoning_gym` (procedural tasks, offline; the held-out split
uses another seed and drops any question that also appears in training) and
`hf` (anything `datasets` loads: a local jsonl/json/parquet/csv file, or a hub
name where the hub is reachable). Bad rows stop the run with one line naming
the file, the row and the field, or are skipped and counted when
`data.on_invalid=skip`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlcore.config import ConfigError

_HF_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


@dataclass
class Prompt:
    id: str
    text: str  # the user-facing question
    ground_truth: str
    token_ids: list[int] = field(default_factory=list)  # after the template
    metadata: dict[str, Any] = field(default_factory=dict)


def reasoning_gym_rows(task: str, size: int, seed: int, task_args: dict) -> list[dict]:
    import reasoning_gym

    import rlcore.arith_mix  # noqa: F401  (registers rlcore's own task, arith_mix)

    try:
        dataset = reasoning_gym.create_dataset(task, size=size, seed=seed, **task_args)
    except (KeyError, ValueError, TypeError) as e:
        raise ConfigError(f"data.task={task!r} / data.task_args={task_args}: reasoning_gym refused it ({e})") from None
    return [{"question": x["question"], "answer": x["answer"], "metadata": x["metadata"]} for x in dataset]


def hf_rows(path: str, split: str) -> list[dict]:
    import datasets

    suffix = Path(path).suffix
    try:
        if suffix in _HF_FORMATS:
            if not Path(path).exists():
                raise ConfigError(f"data.path={path}: no such file")
            ds = datasets.load_dataset(_HF_FORMATS[suffix], data_files=path, split="train")
        elif path in _HF_FORMATS.values():  # datasets would read every such file in the current folder
            raise ConfigError(f"data.path={path} names a format, not a file: give the file, e.g. data=train.{path}")
        else:
            ds = datasets.load_dataset(path, split=split)
    except ConfigError:
        raise
    except Exception as e:  # datasets raises many types; the user needs the path and the reason
        raise ConfigError(f"data.path={path}: could not load ({type(e).__name__}: {first_line(e)})") from None
    return list(ds)


def first_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else "no message"


def apply_template(tokenizer, text: str, cfg) -> list[int]:
    if cfg.template == "raw":
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    messages = ([{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []) + [
        {"role": "user", "content": text}
    ]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    return list(ids)


def target_length(choices: list[int], seed: int, index: int) -> int:
    """Row `index`'s L1 target: fixed by the split's seed and the index alone, so every run over
    the same data (a resumed one, `rlcore eval`) gives each row the same target."""
    return random.Random(seed * 1_000_003 + index).choice(list(choices))


def build_prompts(rows: list[dict], source: str, cfg, tokenizer, seed: int) -> tuple[list[Prompt], int]:
    """Rows → Prompts, validated. Returns (prompts, number skipped). With data.target_length.choices,
    each prompt's message states its target length (drawn with `seed`), which metadata carries.
    Like the system prompt, the instruction is in token_ids only: Prompt.text stays the
    question, which completion fns (rlcore.arith) parse."""
    prompts, skipped = [], 0
    for i, row in enumerate(rows):
        problem, metadata = None, dict(row.get("metadata") or {})
        for key in (cfg.prompt_field, cfg.answer_field):
            if row.get(key) in (None, ""):
                problem = f"row {i}: field {key!r} is missing or empty (fields: {', '.join(row)}); set data.prompt_field / data.answer_field"
        if problem is None and cfg.bucket_by:
            if cfg.bucket_by not in metadata:
                problem = f"row {i}: metadata has no field {cfg.bucket_by!r} (fields: {', '.join(metadata)}); set data.bucket_by to one of them"
            else:
                metadata["bucket"] = f"{cfg.bucket_by}_{metadata[cfg.bucket_by]}"
        if problem is None:
            message = str(row[cfg.prompt_field])
            if cfg.target_length.choices:
                metadata["target_length"] = target_length(cfg.target_length.choices, seed, i)
                message += " " + cfg.target_length.instruction.format(target=metadata["target_length"])
            ids = apply_template(tokenizer, message, cfg)
            if len(ids) > cfg.max_prompt_tokens:
                parts = f"field {cfg.prompt_field!r}" + (" + data.target_length.instruction" if cfg.target_length.choices else "")
                problem = f"row {i}: the prompt ({parts}, templated) is {len(ids)} tokens, over data.max_prompt_tokens={cfg.max_prompt_tokens}"
        if problem:
            if cfg.on_invalid == "skip":
                skipped += 1
                continue
            raise ConfigError(f"{source}: {problem} (or data.on_invalid=skip to skip such rows)")
        prompts.append(
            Prompt(
                id=f"{source}#{i}",
                text=str(row[cfg.prompt_field]),
                ground_truth=str(row[cfg.answer_field]),
                token_ids=ids,
                metadata=metadata,
            )
        )
    if not prompts:
        raise ConfigError(f"{source}: no usable rows ({len(rows)} rows, {skipped} skipped)")
    return prompts, skipped


def load_splits(cfg, tokenizer) -> tuple[list[Prompt], list[Prompt]]:
    """(train, held-out) prompts for data config `cfg`."""
    if cfg.source == "reasoning_gym":
        train_rows = reasoning_gym_rows(cfg.task, cfg.train_size, cfg.train_seed, dict(cfg.task_args))
        eval_rows = reasoning_gym_rows(cfg.task, cfg.eval_size, cfg.eval_seed, dict(cfg.task_args))
        held_out = {r["question"] for r in eval_rows}
        train_rows = [r for r in train_rows if r["question"] not in held_out]
        train_src, eval_src = f"reasoning_gym:{cfg.task}(seed={cfg.train_seed})", f"reasoning_gym:{cfg.task}(seed={cfg.eval_seed})"
    else:
        train_rows = hf_rows(cfg.path, cfg.split)
        if cfg.eval_path or cfg.eval_split:
            eval_rows = hf_rows(cfg.eval_path or cfg.path, cfg.eval_split or cfg.split)
        else:  # hold out the last eval_size rows
            if len(train_rows) <= cfg.eval_size:
                raise ConfigError(
                    f"data.path={cfg.path}: {len(train_rows)} rows cannot spare data.eval_size={cfg.eval_size} for evaluation; "
                    "lower data.eval_size or give data.eval_path"
                )
            train_rows, eval_rows = train_rows[: -cfg.eval_size], train_rows[-cfg.eval_size :]
        train_src, eval_src = cfg.path, cfg.eval_path or cfg.path
    train, _ = build_prompts(train_rows, train_src, cfg, tokenizer, cfg.train_seed)
    held_out_prompts, _ = build_prompts(eval_rows, eval_src, cfg, tokenizer, cfg.eval_seed)
    return train, held_out_prompts


class PromptSampler:
    """Shuffled passes over the dataset; its position is part of every checkpoint."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed = size, seed
        self.epoch, self.position = 0, 0
        self._order = self._shuffle()

    def _shuffle(self) -> list[int]:
        order = list(range(self.size))
        random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        return order

    def take(self, n: int) -> list[int]:
        out = []
        while len(out) < n:
            if self.position == self.size:
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._shuffle()
            out.append(self._order[self.position])
            self.position += 1
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "size": self.size, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state["size"] != self.size or state["seed"] != self.seed:
            raise ConfigError(
                f"resume: the checkpoint's sampler covered {state['size']} prompts with seed {state['seed']}, "
                f"this run has {self.size} with seed {self.seed}; resume with the same data and trainer.seed"
            )
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._shuffle()
