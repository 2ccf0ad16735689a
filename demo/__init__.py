"""`gradwatch demo`: a real 2-rank torchrun job with a fault, the full monitoring stack, a live view and a summary."""
