"""What a run is asked to do: `RunConfig` (one pydantic section per stage, recipes, overrides, the resume
check), each section's backends, and how a recipe says to start a model server. Pure: no IO beyond reading recipes."""
