"""Online experiments between served model variants: the statistics (`stats`), pure."""
