"""The kopf operator: thin handlers -> pure builders and status logic -> one Kubernetes API wrapper."""
