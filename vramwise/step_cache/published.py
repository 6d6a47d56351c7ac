"""Published calibration data and figures for the step-cache rules (facts as data, one place to cite them).

Every number here is copied from the source named next to it; none was measured by this pack. Random-weight
benchmarks (``bench/step_cache_bench.py``) measure only the mechanics (the cost of a skipped step), never which
steps a real model may skip.
"""

from __future__ import annotations

# ---- EasyCache ---------------------------------------------------------------------------------------------------
# ComfyUI 0.3.75 comfy_extras/nodes_easycache.py (EasyCache node): reuse_threshold 0.2, start_percent 0.15,
# end_percent 0.95, subsample_factor 8. Model-agnostic, no calibration.
EASYCACHE_THRESHOLD = 0.2
EASYCACHE_START = 0.15
EASYCACHE_END = 0.95
EASYCACHE_SUBSAMPLE = 8

# ---- TeaCache (official repo ali-vilab/TeaCache, TeaCache4Wan2.1/teacache_generate.py) -----------------------------
# Polynomial (numpy poly1d order, highest degree first) mapping the relative L1 change of the timestep embedding
# (``e``, the time embedder's output before the 6x projection; the repo's non-"ret_steps" mode) to the predicted
# relative change of the blocks' output. That mode always computes the first and the last step.
TEACACHE_COEFFICIENTS = {
    "480P": (-3.02331670e+02, 2.23948934e+02, -5.25463970e+01, 5.87348440e+00, -2.01973289e-01),
    "720P": (-114.36346466, 65.26524496, -18.82220707, 4.91518089, -0.23412683),
}
# Thresholds users pick (slow / medium / fast), as listed next to these coefficients in Wan2GP's gradio server
# (deepbeepmeep's mmgp-based Wan app: 480p [0.13, 0.19, 0.26], 720p [0.18, 0.2, 0.3]); the middle one is the
# default here. (The official script's own default, 0.2, is documented there for T2V: "0.1 for 2.0x, 0.2 for 3.0x".)
TEACACHE_THRESHOLDS = {"480P": (0.13, 0.19, 0.26), "720P": (0.18, 0.2, 0.3)}
TEACACHE_THRESHOLD = {"480P": 0.19, "720P": 0.2}

# ---- MagCache (official repo Zehong-Ma/MagCache, MagCache4Wan2.1/magcache_generate.py) -----------------------------
# Mean magnitude ratio of the blocks' residual between consecutive steps, calibrated on 40 steps, cond and uncond
# interleaved (the first pair is padding). Defaults of that script: threshold 0.12, K (max skipped steps in a row) 2,
# retention_ratio 0.2 (the first 20% of the steps are always computed). Other step counts take the nearest entry.
MAGCACHE_THRESHOLD = 0.12
MAGCACHE_K = 2
MAGCACHE_RETENTION = 0.2
MAGCACHE_RATIOS = {
    "480P": (1.0, 1.0, 0.98783, 0.98993, 0.97559, 0.97593, 0.98311, 0.98319, 0.98202, 0.98225, 0.9888, 0.98878,
             0.98762, 0.98759, 0.98957, 0.98971, 0.99052, 0.99043, 0.99383, 0.99384, 0.98857, 0.9886, 0.99065,
             0.99068, 0.98845, 0.98847, 0.99057, 0.99057, 0.98957, 0.98961, 0.98601, 0.9861, 0.98823, 0.98823,
             0.98756, 0.98759, 0.98808, 0.98814, 0.98721, 0.98724, 0.98571, 0.98572, 0.98543, 0.98544, 0.98157,
             0.98165, 0.98411, 0.98413, 0.97952, 0.97953, 0.98149, 0.9815, 0.9774, 0.97742, 0.97825, 0.97826,
             0.97355, 0.97361, 0.97085, 0.97087, 0.97056, 0.97055, 0.96588, 0.96587, 0.96113, 0.96124, 0.9567,
             0.95681, 0.94961, 0.94969, 0.93973, 0.93988, 0.93217, 0.93224, 0.91878, 0.91896, 0.90955, 0.90954,
             0.92617, 0.92616),
    "720P": (1.0, 1.0, 0.99428, 0.99498, 0.98588, 0.98621, 0.98273, 0.98281, 0.99018, 0.99023, 0.98911, 0.98917,
             0.98646, 0.98652, 0.99454, 0.99456, 0.9891, 0.98909, 0.99124, 0.99127, 0.99102, 0.99103, 0.99215,
             0.99212, 0.99515, 0.99515, 0.99576, 0.99572, 0.99068, 0.99072, 0.99097, 0.99097, 0.99166, 0.99169,
             0.99041, 0.99042, 0.99201, 0.99198, 0.99101, 0.99101, 0.98599, 0.98603, 0.98845, 0.98844, 0.98848,
             0.98851, 0.98862, 0.98857, 0.98718, 0.98719, 0.98497, 0.98497, 0.98264, 0.98263, 0.98389, 0.98393,
             0.97938, 0.9794, 0.97535, 0.97536, 0.97498, 0.97499, 0.973, 0.97301, 0.96827, 0.96828, 0.96261,
             0.96263, 0.95335, 0.9534, 0.94649, 0.94655, 0.93397, 0.93414, 0.91636, 0.9165, 0.89088, 0.89109,
             0.8679, 0.86768),
}

# ---- What the published figures say (quality and speed of real models), shown next to the defaults -------------
PUBLISHED = {
    "easycache": "EasyCache: ComfyUI core's defaults (threshold 0.2, window 0.15-0.95); no Wan2.1 I2V speed or "
                 "quality figure was verified for this pack",
    "teacache": "TeaCache, Wan2.1 720p x 129 frames, one H100: 1.93x (slow: LPIPS 0.30, PSNR 17.5 dB against "
                "the uncached video) / 2.64x (fast: LPIPS 0.34, PSNR 16.8 dB), from the PromptTea4Wan2.1 README table",
    "magcache": "MagCache on Wan2.1: ~1.75-1.9x at threshold 0.12, K 2, retention 0.2 (official repo's figures)",
    "fixed": "fixed: a test and benchmark schedule, not a quality setting",
}
