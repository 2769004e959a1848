"""Offline merges: the sidecar's merges (lawa.merges) of saved checkpoints, written in the layout of
their inputs. Uniform over the latest k is LAWA; linear, cosine and 1-sqrt weight them like that
decay (averaging/lawa.py: the merge that emulates such a cooldown).

    python -m averaging.offline --out OUT INPUT [INPUT ...] [--weights uniform|linear|cosine|1-sqrt]
    python -m averaging.offline --out OUT --from-dir DIR [--k 5 | --window-tokens N] [--spacing N] [--weights W]

The inputs are all of one kind, and OUT is of the same kind:

  slot        one of our snapshot folders (manifest.json + COMMITTED): OUT is a committed slot of
              kind "offline", averaged one (dp, tp) rank at a time; model states from the newest.
  deepspeed   a DeepSpeed checkpoint tag folder (*_model_states.pt, *_optim_states.pt; ZeRO 0-3):
              OUT is a tag folder with the fp32 master partitions and the floating-point `module`
              tensors averaged, file by file, that zero_to_fp32 consolidates. WEIGHTS ONLY: the
              optimizer moments (exp_avg, exp_avg_sq) are dropped, so resume from it with
              load_optimizer_states=False. A `latest` file is written next to OUT if none exists.
  hf          a Hugging Face model folder (model.safetensors, pytorch_model.bin, or sharded with an
              *.index.json): OUT has the newest input's file names, sharding and index, and its
              config/tokenizer files (not its optimizer/scheduler/RNG state).
  safetensors a .safetensors file;  torch  a .pt/.bin/.pth state dict (or a dict holding one under
              model/state_dict/module; other entries are kept from the newest, optimizer ones dropped).

"Newest" is the input with the highest step (slot manifest; else a step_N, global_stepN or
checkpoint-N name); when some input has no step, the last one on the command line. Averages are
taken in fp32 and cast back to each tensor's dtype; non-floating tensors come from the newest.
--from-dir picks from DIR's step-named subfolders (committed ones only for slots, complete ones
only for the launcher's checkpoints) the newest k spaced at least --spacing steps apart, or with
--window-tokens every one (so spaced) within N tokens of the newest, as a merge's window_tokens
does: tokens come from our slots' and checkpoints' own records, else from --tokens-per-step. A
weighting other than uniform needs each input's step (a slot's manifest, or a step in its name).
Every torch file is unpickled weights-only (tensors and DeepSpeed's plain types; anything else is
refused, naming the file) unless --trust-pickle says you trust the inputs; files of our own slots
and checkpoints are verified against their folder's checksums first. OUT is written into a hidden sibling and renamed at the end: a crash leaves no OUT.
"""
from averaging.offline.cli import main

__all__ = ["main"]
