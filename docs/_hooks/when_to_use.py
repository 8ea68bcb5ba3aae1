"""'When to use it' for each optimizer page: a short curated text per registry name, and a
fallback built from the registry record for an optimizer nobody has written one for yet."""

from __future__ import annotations

from typing import Any

WHEN_TO_USE: dict[str, str] = {
    "sgd": "Convolutional networks trained with a tuned lr schedule (ResNets on ImageNet), where "
           "SGD with momentum 0.9 and Nesterov often generalizes best; the cheapest state (none, or "
           "one buffer with momentum). Needs a larger lr than Adam-like methods and a schedule.",
    "momentum_sgd": "When porting code written with the velocity form of momentum "
                    "(`dw = mu dw - lr g`). Same trajectory as `SGD(momentum=mu)` at a constant lr; "
                    "on an lr schedule it reacts more smoothly, as the accumulated velocity keeps its scale.",
    "adam": "The default for most models when you do not want to tune much: transformers, RNNs, "
            "small MLPs. Prefer AdamW when you use weight decay.",
    "adamw": "The standard for transformers and most modern training with weight decay: decay "
             "is decoupled from the adaptive step, so its strength does not depend on the gradient scale.",
    "amsgrad": "When Adam's effective step grows too large late in training (rare gradients with "
               "large magnitude); costs one more state tensor than Adam.",
    "adam_mini": "Transformers where Adam's second moment is a memory cost: one value per head, token "
                 "or neuron instead of per entry (about half of AdamW's state), with AdamW-like "
                 "results reported by its authors. Pass `model.named_parameters()` (the blocks come "
                 "from the names) and the model's `dim` and `n_heads`.",
    "adam_warmup": "Reproducing code that warms up inside the optimizer (labml). For new code, use "
                   "AdamW with a schedule from `optforge.schedules`.",
    "noam": "Reproducing the original Transformer's lr schedule (inverse square root with warmup, "
            "scaled by d_model); `lr` is a scale of that schedule.",
    "radam": "Adam without a warmup schedule: the rectification damps the first steps, when the "
             "second-moment estimate is still noisy.",
    "adabelief": "Where Adam generalizes worse than SGD (image classification) but you want Adam's "
                 "speed: the step adapts to the gradient's deviation from its EMA.",
    "compass": "Training scripts that used LodeW/Compass (diffusion fine-tuning); an Adam variant "
               "whose amplified momentum speeds up progress along consistent directions, with "
               "optional gradient centralization.",
    "lion": "Large models where memory matters: one state tensor (half of Adam's). Use an lr "
            "3-10x smaller than AdamW's and a larger weight decay.",
    "adopt": "Where Adam is unstable with a small beta2 or needs a long warmup: ADOPT normalizes by "
             "the previous second moment and converges for any beta2.",
    "ademamix": "Long training runs (language models) that benefit from a very slow momentum "
                "mixed into Adam's; use the alpha/beta3 warmups over the run length.",
    "adan": "Vision and language models where a Nesterov-style estimate helps; often tolerates "
            "larger lrs than AdamW. Costs four state tensors.",
    "mars": "Large-batch or language-model training where variance reduction of the gradient "
            "speeds up AdamW; 2-D matrices get the corrected gradient, the other tensors AdamW "
            "with their own lr_1d, betas_1d and weight_decay_1d (the authors' defaults).",
    "lamb": "Very large batches (BERT pre-training at 32k-64k): the per-tensor trust ratio keeps "
            "every layer's step proportional to its weight norm.",
    "schedule_free_adamw": "When you do not know the training length in advance: no lr schedule "
                           "to tune, the averaged iterate does its job. Call `opt.train()` / "
                           "`opt.eval()` around evaluation.",
    "schedule_free_sgd": "SGD's use cases without a decay schedule; call `opt.train()` / "
                         "`opt.eval()` around evaluation.",
    "prodigy": "When you do not want to tune the lr at all: Prodigy estimates the distance to the "
               "solution and sets the step size itself (keep `lr=1`).",
    "adafactor": "Very large models where Adam's second moment does not fit in memory: factored "
                 "row/column statistics need O(n + m) memory for an n x m matrix.",
    "came": "Memory-efficient like Adafactor, with a confidence-guided correction that makes it "
            "as stable as Adam on large language models.",
    "muon": "Hidden weight matrices of transformers and CNNs (not embeddings, heads, biases or "
            "norms, which get AdamW): orthogonalized momentum updates train faster per step.",
    "normuon": "Where Muon fits (hidden weight matrices of transformers; embeddings, heads, biases and "
               "norms get AdamW), when its update is uneven across output neurons: the per-row second "
               "moment evens them out at one extra number per row. Its authors report more efficient "
               "language-model pretraining than both Muon and AdamW.",
    "nadam": "Adam with a Nesterov look-ahead on the momentum: often slightly faster early "
             "progress than Adam at the same lr; `decoupled_weight_decay=True` is NAdamW.",
    "rmsprop": "Recurrent networks and reinforcement learning (A3C/DQN-style setups) that were "
               "tuned with RMSprop; `centered=True` divides by a variance estimate instead.",
    "adagrad": "Sparse features (embeddings, linear models on bag-of-words): rarely-seen "
               "coordinates keep large steps. Supports sparse gradients. The step only shrinks, "
               "so long runs stall.",
    "adamax": "Adam with an infinity-norm second moment: steps bounded by lr, robust to rare "
              "very large gradients (embeddings).",
    "adadelta": "When you want no lr to tune: the step is a ratio of running RMS values (keep "
                "`lr=1`).",
    "rprop": "Full-batch training of small networks: only gradient signs matter, each "
             "coordinate adapts its own step. Not for minibatches (noisy signs).",
    "asgd": "Convex or near-convex problems where an averaged iterate (`state['ax']`, set "
            "`t0` to when averaging starts) generalizes better than the last one.",
    "soap": "When compute per step is cheap relative to the model's quality: Shampoo's "
            "preconditioner with Adam run in its eigenbasis, often fewer steps than AdamW.",
    "galore_adamw": "Training or fine-tuning a large model whose Adam state does not fit in memory: "
                    "the moments of each projected matrix are rank x n instead of m x n. Keep "
                    "`rank` well below the matrix sizes (the paper: 128 to 512 for 1B to 7B models), "
                    "and put embeddings and heads in a group with `rank=None` if they should not be "
                    "projected.",
    "psgd_kron": "When a second-order-style preconditioner pays for its cost (small to mid-size "
                 "models, or steps dominated by data rather than optimizer time): it learns a "
                 "Kronecker-factored whitening preconditioner, with no eigendecompositions. Cap "
                 "the factors with `preconditioner_max_size` for large matrices (each dense factor "
                 "is d x d), and set `seed` to choose the random draws.",
    "shampoo": "Replacing a tuned AdamW (or SGD) when extra compute per step buys fewer steps: "
               "Shampoo's Kronecker-factored preconditioner with the step sizes of the AdamW it grafts "
               "from, as in the AlgoPerf-winning setup (`max_preconditioner_dim=8192`, "
               "`precondition_frequency=100`). Keep grafting on: without it, float32 inverse roots of "
               "rank-deficient factors are at noise level.",
    "sparse_adam": "Large embedding tables trained with `nn.Embedding(sparse=True)`: only the rows "
                   "a batch looks up are read and updated, with Adam's moments kept per row. Dense "
                   "gradients are refused; pair it with another optimizer for the dense layers.",
    "lbfgs": "Small, smooth, full-batch problems (curve fitting, logistic regression, style "
             "transfer on one image) where a quasi-Newton step converges in far fewer iterations "
             "than first-order methods. Use `line_search_fn=\"strong_wolfe\"` unless lr is tuned; "
             "not for noisy mini-batch gradients.",
}


def when_to_use(info: Any) -> str:
    text = WHEN_TO_USE.get(info.name)
    if text:
        return text
    kind = ("an elementwise update, so `fused=True` and FSDP2 work" if info.elementwise else
            "a non-elementwise update (per-tensor norms or matrix structure): eager only, DDP but not FSDP2")
    return (f"{info.description}. No curated advice yet; it has {kind}. Compare it with your current "
            f"optimizer on your task, e.g. `optforge compare --optimizers adamw,{info.name} --tune`.")
