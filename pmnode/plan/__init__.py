"""Planning a run: per-stage costs, the GPU table, the closed-form rates and `pmnode plan`'s report."""
