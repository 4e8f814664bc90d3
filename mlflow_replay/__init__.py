"""mlflow-replay: provision read-only MLflow viewers of published experiment stores."""
