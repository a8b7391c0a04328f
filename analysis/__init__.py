"""Analysis of pcl_tune experiment folders (tables, plots, report). Filled in by the analysis issue."""
