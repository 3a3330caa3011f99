"""Event simulator of schedule programs, Chrome-trace export and Gantt charts (pure Python)."""
