"""EleutherAI's lm-evaluation-harness over our weights: a model backend (the harness's `LM`
interface) on our own forward, one process or a group of ranks whose forward is collective, and
the one way this project scores a task.

Tasks are the harness's: names it knows, the YAMLs of an include folder (`--include_path`,
`eval.harness_include`), and the two JSON-lines formats of `eval.tasks`, which become harness task
configs here (`jsonl_task`):

  last word (LAMBADA-style)   {"text": "... the passage ending in its target word"}
      loglikelihood of the last word (with its leading space) after the rest:
      `acc` (every token the greedy one) and `perplexity` (the harness's lambada metrics).
  multiple choice (HellaSwag/PIQA-style)   {"context": "...", "choices": ["...", ...], "answer": 1}
      `acc` (highest summed log-likelihood) and `acc_norm` (per character of the choice).

Nothing downloads: datasets load with the Hugging Face hub offline, so a task whose data is not
on this machine (local files, or the datasets cache) is refused by name, before anything runs.

Sharded scoring: every rank passes the harness all requests; each scores the sequences i ≡ r
(mod n), making as many forwards as the busiest rank, and the ranks swap their scores, so the
harness sees one model (rank 0 of 1) and every rank computes the same metrics.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from averaging.scoring import DEFAULT_BATCH_TOKENS, Logits, idle_forward, score_shard, to_sequence

# The hub stays offline in every process that scores (set before `datasets` is imported).
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from lm_eval import utils as harness_utils  # noqa: E402
from lm_eval.api.model import TemplateLM  # noqa: E402

Gather = Callable[[Any], list[Any]]  # one value from every rank, in rank order
TaskDict = dict[str, Any]  # lm_eval's TaskManager.load() result


class HarnessTaskError(ValueError):
    """A task the harness cannot run here: one line naming it (`task`: the name or file as given)."""

    def __init__(self, message: str, task: Optional[str] = None):
        super().__init__(message)
        self.task = task


# ---------------------------------------------------------------------------------------------
# tasks


def jsonl_task(path: str) -> dict[str, Any]:
    """One of the two JSON-lines formats as a harness task config; the format is read off the
    first record (the harness checks the others as it reads them)."""
    name = Path(path).stem
    with open(path) as f:
        first = next((line for line in f if line.strip()), None)
    if first is None:
        raise HarnessTaskError(f"{path}: no examples", path)
    try:
        record = json.loads(first)
    except json.JSONDecodeError as e:
        raise HarnessTaskError(f"{path}: the first record is not JSON ({e.msg})", path) from None
    common = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": os.path.abspath(path)}},
              "test_split": "test", "target_delimiter": ""}
    if "text" in record:
        return {**common, "output_type": "loglikelihood",
                "doc_to_text": "{{ text.rstrip().rsplit(' ', 1)[0] }}",
                "doc_to_target": "{{ ' ' + text.rstrip().rsplit(' ', 1)[1] }}",
                "metric_list": [{"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
                                {"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}
    if "choices" in record:
        return {**common, "output_type": "multiple_choice", "doc_to_text": "{{ context }}",
                "doc_to_choice": "{{ choices }}", "doc_to_target": "{{ answer }}",
                "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}]}
    raise HarnessTaskError(f"{path}:1: expected {{\"text\": ...}} (last word) or {{\"context\", \"choices\", "
                           f"\"answer\"}} (multiple choice)", path)


def task_specs(names: list[str]) -> list[Any]:
    """Harness task names as they are, and .jsonl files as task configs."""
    return [jsonl_task(n) if n.endswith(".jsonl") else n for n in names]


def load_tasks(names: list[str], include: Optional[str] = None) -> TaskDict:
    """The harness's tasks, each loaded with its data (offline). The harness's own task index (some
    thousands of YAMLs, seconds to read) is read only when a name is not in `include`."""
    from lm_eval.tasks import TaskManager

    specs = task_specs(names)
    wanted = [s for s in specs if isinstance(s, str)]
    if include is not None and not os.path.isdir(include):
        raise HarnessTaskError(f"no such task folder: {include}")
    manager = TaskManager(include_path=include, include_defaults=False) if include else None
    if manager is None or any(name not in manager.all_tasks for name in wanted):
        manager = TaskManager(include_path=include)
    for name in wanted:
        if name not in manager.all_tasks:
            where = f" or in {include}" if include else " (set the include folder for your own task YAMLs)"
            raise HarnessTaskError(f"{name}: the harness has no task of this name{where}", name)
    loaded: TaskDict = {"tasks": {}, "groups": {}, "group_map": {}}
    for name, spec in zip(names, specs):
        label = spec if isinstance(spec, str) else spec["dataset_kwargs"]["data_files"]["test"]
        try:
            one = manager.load([spec])
        except Exception as e:  # the harness and `datasets` raise whatever their loaders raise
            raise HarnessTaskError(f"{label}: cannot load its data ({no_download_reason(e)})", name) from None
        for key in loaded:
            loaded[key].update(one[key])
    return loaded


def no_download_reason(e: Exception) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    if "offline" in text.lower() or "connect" in text.lower() or "hub" in text.lower():
        return f"it needs a dataset from the internet, and nothing downloads here: {text[:200]}"
    return text[:300]


def flat_results(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """The harness's results as {task: {metric: value}}: the filter named only where it is not
    `none`, no stderr, and `n` the examples scored."""
    out: dict[str, dict[str, float]] = {}
    for task, metrics in results["results"].items():
        row: dict[str, float] = {}
        for key, value in metrics.items():
            if "," not in key or "_stderr" in key or not isinstance(value, (int, float)):
                continue
            metric, filter_name = key.split(",", 1)
            row[metric if filter_name == "none" else key] = float(value)
        n = results.get("n-samples", {}).get(task, {}).get("effective")
        if n is not None:
            row["n"] = int(n)
        out[task] = row
    return out


def evaluate(lm: ShardedLM, tasks: TaskDict, limit: int = 0, bootstrap_iters: int = 0) -> dict[str, Any]:
    """The harness's results dict. Collective when the lm's forward is: every rank runs the
    harness on every request."""
    from lm_eval.evaluator import evaluate as harness_evaluate

    return harness_evaluate(lm=lm, task_dict=tasks, limit=limit or None, bootstrap_iters=bootstrap_iters,
                            log_samples=False)


# ---------------------------------------------------------------------------------------------
# the backend


class ShardedLM(TemplateLM):
    """The harness's causal-LM interface over `logits` (ours: a module, a ZeRO engine, tensor-
    parallel logits gathered). `shard` (r, n) and `gather` split the work among n ranks."""

    def __init__(self, logits: Logits, tokenizer, block_size: int, device: torch.device,
                 shard: tuple[int, int] = (0, 1), gather: Optional[Gather] = None,
                 batch_tokens: int = DEFAULT_BATCH_TOKENS):
        super().__init__()
        if shard[1] > 1 and gather is None:
            raise ValueError("a sharded backend needs a gather")
        self.logits, self.tokenizer, self.block_size = logits, tokenizer, block_size
        self._device, self.shard, self.gather, self.batch_tokens = device, shard, gather, batch_tokens

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def max_length(self) -> int:
        return self.block_size

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.file_name

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string)

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens)

    def _merged(self, mine: dict[int, Any]) -> dict[int, Any]:
        if self.shard[1] == 1:
            return mine
        return {k: v for part in self.gather(mine) for k, v in part.items()}

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        sequences = [to_sequence(context, continuation, self.block_size) for _, context, continuation in requests]
        with torch.no_grad():
            scores = self._merged(score_shard(sequences, self.logits, self.device, self.shard, self.batch_tokens))
        return [(scores[i][0], scores[i][1]) for i in range(len(sequences))]

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return super().loglikelihood(requests, disable_tqdm=True)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """A document's log-likelihood in disjoint windows of the block size, each after its own
        context (the harness's own windowing), the first after the end-of-text token."""
        windows, owners = [], []
        for index, (text,) in enumerate(req.args for req in requests):
            for context, continuation in map(harness_utils.make_disjoint_window, harness_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows)):
            totals[owner] += logprob
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuation until a stop string, the end-of-text token or max_gen_toks tokens,
        one sequence per forward. Sharded, a rank does not stop at a stop string (it cannot know
        whether the others do) and every rank makes as many forwards as the largest budget."""
        plans = []
        for context, kwargs in (req.args for req in requests):
            kwargs = dict(kwargs)
            if kwargs.pop("do_sample", False) or kwargs.get("temperature", 0.0) > 0.0:
                raise HarnessTaskError("this backend generates greedily: set do_sample: false, temperature: 0")
            until = kwargs.get("until", [])
            until = [until] if isinstance(until, str) else list(until)
            plans.append((context, until, int(kwargs.get("max_gen_toks", 256))))
        rank, n = self.shard
        budget = [sum(plans[i][2] for i in range(r, len(plans), n)) for r in range(n)]
        mine, forwards = {}, 0
        with torch.no_grad():
            for i in range(rank, len(plans), n):
                context, until, max_tokens = plans[i]
                ids, new = self.tok_encode(context), []
                for _ in range(max_tokens):
                    window = (ids + new)[-self.block_size:]
                    x = torch.tensor([window], dtype=torch.long, device=self.device)  # (1, T)
                    keep = torch.zeros_like(x, dtype=torch.bool)
                    keep[0, -1] = True
                    token = int(self.logits(x, keep)[-1].argmax())
                    forwards += 1
                    if token == self.eot_token_id:
                        break
                    new.append(token)
                    if n == 1 and any(stop in self.tok_decode(new) for stop in until):
                        break
                text = self.tok_decode(new)
                for stop in until:
                    text = text.split(stop)[0]
                mine[i] = text
            for _ in range(max(budget) - forwards if n > 1 else 0):
                idle_forward(self.logits, self.device)
        texts = self._merged(mine)
        return [texts[i] for i in range(len(plans))]
