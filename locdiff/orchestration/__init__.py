"""The orchestration wing: what runs a training or an evaluation around the engine.

- `spec`: the data sets (`DataSet`) and the one description of a run (`RunSpec`), built at the boundary;
- `stages`: the pipeline's stages as functions (ingest, embed, train, evaluate, promote), which the
  Prefect flows in flows/ wrap;
- `tracker`: the MLflow tracker the engine gets as a callback (per-step loss and lr);
- `ray_session`: starting or reaching Ray (127.0.0.1, token authentication, the forwarded environment);
- `ray_train`: training on Ray Train; `ray_worker`: the function each Ray Train worker runs.
"""
