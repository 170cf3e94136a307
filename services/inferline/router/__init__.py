"""The router: authenticates, plans and runs a request through features, model and post-processing."""
