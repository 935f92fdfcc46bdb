"""Cases on disk: discovery and datalists, input checks (pre-flight), loading transforms, cached datasets and the
synthetic demo data. Imports ``custom.core`` only."""
