"""`capwatch serve`: a small local web page over the index (search grid, photo page, status).

``app`` assembles the Starlette application behind its guard, ``routes`` holds the pages, ``catalog`` asks the
index, ``editing`` writes a person's caption or asks the model again, ``thumbnails`` renders and caches WebP
pictures, ``security`` holds the token, CSRF and which-files-may-be-served rules, ``gate`` bounds what connections
that have not shown the token may hold (uvicorn's h11 protocol with a header deadline and a cap on them).
Floors: the CLI imports this; this imports library/, models/ and metadata/, never daemon/ or the CLI.
"""
