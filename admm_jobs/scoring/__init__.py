"""Scoring models on labelled images (:mod:`.metrics`) and drawing the results (:mod:`.report`)."""
