"""Memory planning: estimates and the auto offload planner."""
