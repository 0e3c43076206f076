from prefill_router.data.dataset import Prompt, RoutingDataset

__all__ = ["Prompt", "RoutingDataset"]
