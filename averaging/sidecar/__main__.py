"""`python -m averaging.sidecar --run-dir RUN_DIR [--once]`: see averaging.sidecar.worker."""
from averaging.sidecar.worker import main
from core.distributed import exit_process

exit_process(main())
