"""Switch mixture of experts and the MMoE matching units (text, vision, cross) and matcher."""
