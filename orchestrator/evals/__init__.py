"""Live evaluation: labelled questions through the served pipeline, the served configuration chosen on served
answers, and the table that compares every configuration with each expert alone."""
