"""The LAWA sidecar: a process group beside the trainers that averages ZeRO-3 shards in place.

  protocol    the files the trainers and the sidecar share (spec, held-out set, done marker, eval log)
  worker      the sidecar itself: `python -m averaging.sidecar --run-dir RUN_DIR`
  supervisor  what runs inside each trainer: starts, watches and restarts its sidecar rank

Importing this package imports none of them: the trainer loads only the supervisor and the
protocol, and the sidecar's process holds no trainer code.
"""
