"""Training: device/precision choice, optimisers and schedules, EMA, the loop."""
