"""The machine and the placement of models on it: profile, plan, autotune."""
