"""Router stage: feature transform, SharedTrunkNet ensemble, baselines, policies, checkpoints."""

from prefill_router.router.base import Policy, Predictor, out_of_fold_proba
from prefill_router.router.decision import RouteDecision
from prefill_router.router.runtime import Router
from prefill_router.router.train import ExtraSource, RouterTrainConfig, train_router
from prefill_router.router.transform import FeatureTransform
from prefill_router.router.trunk import SharedTrunkNet, TrunkConfig, TrunkEnsemble

__all__ = ["FeatureTransform", "Policy", "Predictor", "RouteDecision", "Router", "RouterTrainConfig", "SharedTrunkNet",
           "TrunkConfig", "TrunkEnsemble", "out_of_fold_proba", "train_router", "ExtraSource"]
