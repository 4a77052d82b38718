"""Independent reference implementations used to cross-check hpcjobs code in tests."""
