"""Reproductions of published experiments, each a set of ordinary runs of resforge.train_run.train.

    degradation.run_degradation(...)   He et al. 2016, Fig. 6 / Table 6: plain vs residual twins
    degradation_results, figures       its table, finding and figures, read from the run folders
"""
