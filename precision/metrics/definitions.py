"""Written definitions of every number the reports show, keyed by the name used in comparison.json.
e is the expected (reference) tensor, a the actual (target) tensor; sums run over elements finite on both sides."""

from precision import names

DEFINITIONS: dict[str, str] = {
    names.RELATIVE_L2: "Relative L2 error ||a - e||_2 / ||e||_2, in float64 over all elements of the tensor.",
    names.MAX_ABS: "Max absolute error max_i |a_i - e_i|.",
    names.MAX_RELATIVE: "Max relative error max_i |a_i - e_i| / max(|e_i|, 1e-6). The 1e-6 floor is this tool's convention (msprobe has none; "
                    "it adds float32 eps to both sides only where e_i is exactly 0): it keeps near-zero reference values from dividing by zero.",
    names.MEAN_ABS: "Mean absolute error mean_i |a_i - e_i|.",
    names.COSINE: "Cosine similarity <e, a> / (||e|| ||a||); 1 when both are all zero, NaN when only one is.",
    names.EUCLIDEAN_DISTANCE: "Euclidean distance ||a - e||_2 (msprobe's EucDist), in float64 over the elements finite on both sides.",
    names.ONE_THOUSANDTH_ERR_RATIO: "One Thousandth Err Ratio (msprobe's name): share of elements with |a_i - e_i| / max(|e_i|, 1e-6) < 0.001. "
                                "The 1e-6 floor is this tool's convention, not msprobe's: on references near 1e-7 the shares differ "
                                "(the msprobe convention reproduces msprobe's).",
    names.FIVE_THOUSANDTHS_ERR_RATIO: "Five Thousandths Err Ratio (msprobe's name): share of elements with |a_i - e_i| / max(|e_i|, 1e-6) < 0.005, "
                                  "with this tool's 1e-6 floor (see one_thousandth_err_ratio).",
    names.CONVENTION: "Whose definitions Cosine, EucDist, MaxAbsErr, MaxRelativeErr and the two err ratios follow. precision-check: the "
                  "definitions here. msprobe: msprobe compare's, exactly: no floor, float32 eps added to both sides where e_i is exactly "
                  "0 (relative error in float32 for float32/bf16/fp16 data), NaN/Inf at the same elements on both sides set to 0 "
                  "(otherwise no number), cosine 1 when both norms are at most float64 eps, numbers rounded to 12 decimals "
                  "(a cosine above 0.9999 to 6). The other metrics are this tool's in both.",
    names.ULP_SHARES: "Share of elements whose bf16 values (after rounding both sides to bf16) are 0, 1, 2 or more than 2 representable bf16 numbers apart, "
                  "and (non-finite) of those where both sides overflow to bf16 Inf, which no distance describes.",
    names.NON_FINITE: "Counts of NaN and Inf on each side and the first [position, column] where either side is not finite; per element, "
                  "actual_only counts the elements non-finite in the target where the reference is finite and mismatched those "
                  "non-finite on both sides with different values (NaN vs +-Inf, +Inf vs -Inf), each with its first [position, column]. "
                  "Never dropped silently.",
    names.KL: "KL(p_e || p_a) = sum_v p_e(v) (log p_e(v) - log p_a(v)) of the softmax of the full-vocabulary logits at one position, in nats, float64.",
    names.TOP1_AGREE: "Share of positions where argmax of the target's logits equals argmax of the reference's (teacher-forced, so both saw the same tokens).",
    names.TOP5_OVERLAP: "Mean over positions of |top5(e) ∩ top5(a)| / 5 (/ the vocabulary size when it is below 5).",
    names.EXPECTED_MARGIN: "The reference's top-1 minus top-2 logit at a position; a flip at a small margin is a near-tie.",
    names.NEAR_TIE: "A teacher-forced top-1 disagreement (reference picks i, target j) is a near-tie flip when the reference's margin m = e_i - e_j is at most bound = ulp_ref + ulp_target + z * sqrt(2) * sigma, where sigma is the RMS of the logit differences a - e over the position's other tokens (i and j left out), ulp_ref and ulp_target are one unit in the last place of max(|e_i|, |e_j|) in each capture's dtype (the stored logits' own rounding), and z = Phi^-1(1 - alpha_1 / 2) with alpha_1 = 1 - (1 - 0.01)^(1/n) for the n positions compared in the run (Sidak: at most a 1% chance of any false real flip in the run if logit errors are normal with that RMS). Otherwise it is a real flip.",
    names.TOKEN_MATCH_RATE: "Free-running greedy generation: positions where the target's token equals the reference's, over the longer length.",
    names.MATCHING_PREFIX: "Free-running greedy generation: number of leading tokens identical on both sides.",
    names.FIRST_DIVERGENCE: "Index of the first generated token that differs (none when identical).",
    names.THREE_WAY_RATIO: "Three-way ratio R = err(target vs FP32 truth) / err(reference vs FP32 truth), with err the relative L2 error. R near 1: both are equally good roundings of the same computation.",
}
