"""The embedded tiny Nemotron 3: procedural tasks (`tasks`) and, in later steps, its tokenizer and
the recipe that trains it end to end."""
