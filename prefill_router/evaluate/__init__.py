"""The evaluate stage: metrics, cost-quality sweeps, the k-fold harness and reports.

    prefill_router.evaluate.metrics    pure NumPy metric functions (AUC, Brier, ECE, oracle, gap captured,
                                       cost savings, RouteLLM APGR/CPT, RouterBench AIQ)
    prefill_router.evaluate.sweep      cost_quality_curve, cheapest_point_reaching
    prefill_router.evaluate.harness    Contender, evaluate_contenders -> Report
    prefill_router.evaluate.report     Report (.to_json, .to_markdown, .plot, .save)
    prefill_router.evaluate.contenders the contenders picked by name (CONTENDERS, build_contenders)
    prefill_router.evaluate.two_model  RouteLLM's APGR / CPT summary of a two-target evaluation

Submodules are imported explicitly so that `metrics` stays light (NumPy and SciPy only).
"""
