"""The job's side of a search and what searches share with the sweepers: the Optuna storage that
survives a database restart, the trial reporter a job prunes with, the study's dashboard."""
