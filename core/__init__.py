"""The FedRecon engine: models, client step, aggregation, server optimizers. Pure TensorFlow and numpy."""
