"""What only the app uses: the model/SAE catalog, feature mixes, the server's workspace, its text, request limits."""
