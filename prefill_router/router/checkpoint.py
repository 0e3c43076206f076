"""Where the router lived before it was split in three; kept so `from prefill_router.router.checkpoint import
...` goes on working. The runtime Router is in router/runtime.py, training in router/train.py, the checkpoint
folder in router/persistence.py.
"""

from prefill_router.router.persistence import CONFIG_FILE, FORMAT, TENSORS_FILE, load_router, save_router
from prefill_router.router.runtime import Router, encoder_identity
from prefill_router.router.train import RouterTrainConfig, train_router

__all__ = ["CONFIG_FILE", "FORMAT", "TENSORS_FILE", "Router", "RouterTrainConfig", "encoder_identity", "load_router",
           "save_router", "train_router"]
