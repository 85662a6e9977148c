"""`icd serve`: one process holds a model and answers the requests of every `icd` command of the same user on a
Unix socket, so that a shell loop pays the model's start-up once."""
