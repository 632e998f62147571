"""Alert rules and alerts arrive with the operations issue."""
