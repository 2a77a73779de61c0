"""The lspsde model zoo: feedforward and residual networks, convex objectives."""
