"""Release formats: writing dictionaries in the layouts other tools load."""
