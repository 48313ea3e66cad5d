"""Redis side of the operator: stream intake and progress events."""
