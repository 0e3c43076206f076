"""The data stage: datasets, readers, prices and costs, token counts, splits, statistics, known datasets."""

from prefill_router.data.builtin import (
    BUILTIN_DATASETS,
    find_reference_features,
    load_dataset,
    load_mmlu_pro,
    load_routellm,
    select_rows,
)
from prefill_router.data.dataset import RoutingDataset
from prefill_router.data.prices import CostModel, Price, PriceTable
from prefill_router.data.prompt import Message, Prompt, as_prompt, check_prompt, prompt_hash, prompt_text
from prefill_router.data.readers import read_routing_data
from prefill_router.data.splits import kfold, normalize_prompt, stratified_sample, train_test_split
from prefill_router.data.stats import dataset_stats, format_stats
from prefill_router.data.tokens import count_tokens

__all__ = ["BUILTIN_DATASETS", "CostModel", "Message", "Price", "PriceTable", "Prompt", "RoutingDataset",
           "as_prompt", "check_prompt", "count_tokens", "dataset_stats", "find_reference_features", "format_stats",
           "kfold", "load_dataset", "load_mmlu_pro", "load_routellm", "normalize_prompt", "prompt_hash",
           "prompt_text", "read_routing_data", "select_rows", "stratified_sample", "train_test_split"]
