"""``asnn-dist tune``: Ray Tune searches in which every trial is a distributed training run.

config/space.py (parse, check, sample the search space; part of config validation) ->
search.py (Tuner, resume, signals) -> trainable.py (one trial = one TorchTrainer of DeepSpeed
workers) -> finish.py (child runs' status, results.py's table and plots on the parent MLflow
run, the best trial registered).
"""
