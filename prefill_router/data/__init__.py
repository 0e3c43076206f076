"""The data stage: routing datasets, readers, prices and costs, token counts, splits, statistics, known datasets."""

from prefill_router.data.builtin import load_mmlu_pro, load_routellm
from prefill_router.data.dataset import Prompt, RoutingDataset
from prefill_router.data.prices import CostModel, Price, PriceTable
from prefill_router.data.readers import read_routing_data
from prefill_router.data.splits import kfold, normalize_prompt, train_test_split
from prefill_router.data.stats import dataset_stats, format_stats
from prefill_router.data.tokens import count_tokens

__all__ = ["Prompt", "RoutingDataset", "read_routing_data", "PriceTable", "Price", "CostModel", "count_tokens",
           "load_mmlu_pro", "load_routellm", "train_test_split", "kfold", "normalize_prompt", "dataset_stats",
           "format_stats"]
