"""``msbnb finetune`` as a script, for launchers that run a file (MindSpore's ``msrun``).

    msrun --worker_num=2 --local_worker_num=2 --master_port=8118 --join=True --log_dir=logs \\
        tools/finetune.py MODEL --output out/adapter --distributed [msbnb finetune options]

Every rank trains on its slice of each global batch; the adapters' gradients are all-reduced (mean);
rank 0 writes ``--output`` and every rank ``<output>/rank_<r>``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

if __name__ == "__main__":
    os.environ.setdefault("GLOG_v", "3")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's msbnb_pass
    from msbnb_pass.cli import main

    sys.exit(main(["finetune", *sys.argv[1:]]))
