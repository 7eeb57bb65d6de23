// Package deploy holds the gcloud deployment of fhirexport: deploy.sh, the example
// export specs in specs/ and the JSON Schemas in schemas/. It has no Go API; its
// tests check the script, the specs and the schemas.
package deploy
