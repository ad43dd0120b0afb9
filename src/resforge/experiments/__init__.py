"""Reproductions of published experiments, composed from `resforge.api` calls.

    degradation.run_degradation(...)   He et al. 2016, Fig. 6 / Table 6: plain vs residual twins
    degradation_results, figures       its table, finding and figures, read from the run folders
"""
